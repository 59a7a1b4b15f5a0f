//! A hostile peer for the end-to-end token tests. It holds a real enforcer certificate and
//! key (as a compromised or misbehaving enforcer would) and speaks the tunnel protocol
//! directly, sending requests whose tokens are forged, tampered, replayed, bound to another
//! TLS session, missing, or vouching for another host's workload. It prints one JSON line
//! per request: the case, the status and reason of the answer.
//!
//! `rogue_peer CA CERT KEY NAME PEER TUNNEL DST TRUST_DOMAIN`
//!
//! With a ninth argument `k=v;k2=v2` it also sends, for each, a genuine token for its own
//! workload that claims that label (case `claim:k=v`): under a control plane, a claim
//! outside the enforcer's scope (`site=london` from a Paris enforcer) must be refused.
use std::{net::SocketAddr, path::Path, time::SystemTime};

use anyhow::{Context, Result, bail};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tessera_policy::Labels;
use tessera_proxy::{
    copy::Ended,
    identity::{
        Identity,
        session::{Proof, Role, SessionSecrets, Tokens, TunnelSession},
        spiffe_id,
    },
    mux::{self, Counts, Stream, splice},
    tls,
    wire::{Request, Response, Source},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

struct Peer {
    tokens: Tokens,
    connector: tokio_rustls::TlsConnector,
    peer: String,
    tunnel: SocketAddr,
}

struct Tunnel {
    send: h2::client::SendRequest<bytes::Bytes>,
    /// The tunnel's receive window (its streams grow it while stalled).
    window: std::sync::Arc<mux::Window>,
    session: TunnelSession,
    /// The stream of the last connected answer.
    connected: Option<Stream>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Peer {
    async fn dial(&self) -> Result<Tunnel> {
        let tcp = TcpStream::connect(self.tunnel).await?;
        let stream = self
            .connector
            .connect(ServerName::try_from(self.peer.clone())?, tcp)
            .await?;
        let conn = stream.get_ref().1;
        let secrets = SessionSecrets::of(conn)?;
        let cert = conn.peer_certificates().and_then(|c| c.first());
        let session = self
            .tokens
            .session(self.peer.clone(), cert, &secrets, Role::Client)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let client = mux::client(stream).await?;
        Ok(Tunnel {
            send: client.send,
            window: client.window,
            session,
            connected: None,
        })
    }
}

async fn ask(t: &mut Tunnel, dst: SocketAddr, proof: Proof) -> Result<Response> {
    let req = Request {
        dst,
        source: Source {
            workload: "web".into(),
            pid: 1,
            uid: 0,
            cgroup_id: 0,
        },
        proof,
    };
    let (response, send) = mux::open(&mut t.send, mux::connect_request(&req))?;
    let (answer, stream) = mux::answered(
        response,
        send,
        &t.window,
        std::time::Duration::from_secs(30),
    )
    .await?;
    t.connected = stream;
    Ok(answer)
}

/// After a `Connected` answer: one exchange with the blast server through its stream, as an
/// application would have it.
async fn use_connection(t: &mut Tunnel) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut app = TcpStream::connect(listener.local_addr()?).await?;
    let (mut ours, _) = listener.accept().await?;
    let client = tokio::spawn(async move {
        app.write_all(b"0\nhello from the rogue\n").await?;
        app.shutdown().await?;
        let mut answer = String::new();
        app.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    });
    let mut stream = t.connected.take().context("no connected stream")?;
    match splice(&mut ours, &mut stream, &Counts::default()).await? {
        Ended::Clean(_) => {}
        Ended::Reset { reason, .. } => bail!("connection reset: {reason}"),
    }
    client.await?
}

fn status(r: &Response) -> String {
    format!("{:?}", r.status)
}

fn report(case: &str, r: &Response) {
    println!(
        "{}",
        serde_json::json!({"case": case, "status": status(r), "reason": r.reason})
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [ca, cert, key, name, peer, tunnel, dst, td, claims @ ..] = a.as_slice() else {
        bail!("usage: rogue_peer CA CERT KEY NAME PEER TUNNEL DST TRUST_DOMAIN [k=v;k2=v2]");
    };
    let id = tls::Credentials::load(Path::new(ca), Path::new(cert), Path::new(key))?;
    let PrivateKeyDer::Pkcs8(pkcs8) = &id.key else {
        bail!("{key}: not PKCS#8")
    };
    let tokens = Tokens::new(
        td.clone(),
        pkcs8.secret_pkcs8_der(),
        id.ca.iter().map(|c| c.to_vec()).collect(),
        10_000,
        5_000,
        true,
    )
    .map_err(anyhow::Error::msg)?;
    let p = Peer {
        tokens,
        connector: tokio_rustls::TlsConnector::from(id.client_config()?),
        peer: peer.clone(),
        tunnel: tunnel.parse().context("TUNNEL")?,
    };
    let dst: SocketAddr = dst.parse().context("DST")?;
    let me = |enforcer: &str| Identity {
        spiffe: spiffe_id(td, enforcer, "web"),
        labels: Labels::new([
            ("app", "web"),
            ("tessera.io/enforcer", enforcer),
            ("tessera.io/workload", "web"),
        ]),
    };
    let token =
        |t: &mut Tunnel, who: &Identity| match p.tokens.prove(&mut t.session, who, dst, now_ms()) {
            Ok(Proof::Token(b)) => b,
            other => panic!("expected a token: {other:?}"),
        };

    // 1. A valid token (sealed with this session's key, sequence number 1), used; then the
    //    very same token again on the same tunnel: replay.
    let mut t1 = p.dial().await?;
    let valid = token(&mut t1, &me(name));
    let r = ask(&mut t1, dst, Proof::Token(valid.clone())).await?;
    report("valid", &r);
    if r.status == tessera_proxy::wire::Status::Connected {
        let answer = use_connection(&mut t1).await?;
        println!(
            "{}",
            serde_json::json!({"case": "valid-exchange", "answer": answer})
        );
    }
    let r = ask(&mut t1, dst, Proof::Token(valid.clone())).await?;
    report("replayed", &r);

    // 2. Forged: the seal (the session tag) of a fresh token altered.
    let mut forged = token(&mut t1, &me(name));
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    report("forged", &ask(&mut t1, dst, Proof::Token(forged)).await?);

    // 3. Tampered: a label value changed after sealing ("web" -> "wex" in the workload label).
    t1.session.forget_sent(); // cold, so the labels are in the token
    let mut tampered = token(&mut t1, &me(name));
    let at = tampered
        .windows(3)
        .rposition(|w| w == b"web")
        .expect("label value in the token");
    tampered[at + 2] = b'x';
    report(
        "tampered",
        &ask(&mut t1, dst, Proof::Token(tampered)).await?,
    );

    // 4. Wrong session: a token bound to tunnel 1 presented on tunnel 2.
    let lifted = token(&mut t1, &me(name));
    let mut t2 = p.dial().await?;
    report(
        "wrong-session",
        &ask(&mut t2, dst, Proof::Token(lifted)).await?,
    );

    // 5. No token at all: an unsigned identity.
    report(
        "no-token",
        &ask(&mut t2, dst, Proof::Unsigned(me(name))).await?,
    );

    // 6. A certified enforcer vouching for another host's workload.
    let foreign = token(&mut t2, &me("host-c"));
    report("foreign", &ask(&mut t2, dst, Proof::Token(foreign)).await?);

    // 7. Truncated: half a token.
    let mut cut = token(&mut t2, &me(name));
    cut.truncate(cut.len() / 2);
    report("truncated", &ask(&mut t2, dst, Proof::Token(cut)).await?);

    // 8. Genuine tokens whose labels claim what the configuration asks (scope tests).
    for claim in claims
        .first()
        .map(String::as_str)
        .unwrap_or_default()
        .split(';')
        .filter(|c| !c.is_empty())
    {
        let (k, v) = claim.split_once('=').context("claims: k=v;k2=v2")?;
        let mut who = me(name);
        who.labels = Labels::new(who.labels.iter().chain([(k, v)]));
        let mut t = p.dial().await?;
        let claimed = token(&mut t, &who);
        report(
            &format!("claim:{claim}"),
            &ask(&mut t, dst, Proof::Token(claimed)).await?,
        );
    }
    Ok(())
}
