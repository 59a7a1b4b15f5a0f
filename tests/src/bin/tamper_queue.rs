//! An on-path attacker for the handshake-mode tests. It reads an NFQUEUE in the test
//! switch's network namespace (bridged packets pass iptables there) and alters the Tessera
//! handshake messages it is given: `flip` inverts one byte of each message (the checksums
//! fixed, as an attacker would), `drop` drops each packet that carries one. Other packets
//! pass. It runs until killed.
//!
//! `tamper_queue QUEUE flip INDEX` | `tamper_queue QUEUE drop`
use anyhow::{Context, Result, bail};
use tessera_proxy::handshake::packet;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let queue_num: u16 = args.first().context("QUEUE")?.parse()?;
    let flip_at: Option<usize> = match args.get(1).map(String::as_str) {
        Some("flip") => Some(args.get(2).context("INDEX")?.parse()?),
        Some("drop") => None,
        other => bail!("unknown mode {other:?}"),
    };
    let mut queue = nfq::Queue::open()?;
    queue.bind(queue_num)?;
    queue.set_copy_range(queue_num, u16::MAX)?;
    println!("ready");
    loop {
        let mut msg = queue.recv()?;
        let verdict = match (packet::detach(msg.get_payload()), flip_at) {
            (Ok(Some((clean, mut message))), Some(i)) if i < message.len() => {
                message[i] ^= 0xff;
                msg.set_payload(packet::attach(&clean, &message)?);
                nfq::Verdict::Accept
            }
            (Ok(Some(_)), None) => nfq::Verdict::Drop,
            _ => nfq::Verdict::Accept,
        };
        msg.set_verdict(verdict);
        queue.verdict(msg)?;
    }
}
