//! The hostile peer (`src/bin/rogue_peer.rs`) run from a test: a compromised enforcer's
//! real key material speaking the tunnel protocol with tokens and claims of its choosing.
//! Both the token tests and the control-plane tests run it and read its answers, one JSON
//! line per case; this is the one place that knows its arguments and its output.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tessera_enforcer::config::IdentityConfig;

use crate::{Host, TUNNEL_PORT, TestNet};

/// What `rogue_peer` printed: its answer for each case it tried.
pub struct RogueAnswers {
    /// Its whole output, for assertion messages.
    pub stdout: String,
    answers: Vec<Value>,
}

impl RogueAnswers {
    /// The answer for `case` (`valid`, `forged`, `claim:site=paris`, ...); panics, showing
    /// the whole output, if the peer did not try it.
    pub fn answer(&self, case: &str) -> &Value {
        self.answers
            .iter()
            .find(|a| a["case"] == case)
            .unwrap_or_else(|| panic!("no answer for {case}: {}", self.stdout))
    }
}

impl TestNet {
    /// Runs the rogue peer `bin` (a test's `env!("CARGO_BIN_EXE_rogue_peer")`: only test
    /// targets are told where cargo built it) unenrolled on `from`, as `from`'s enforcer
    /// with its `[ca, cert, key]` files, against `to`'s tunnel port and its workload's
    /// `port`, in the trust domain the enforcers use. `claims` (`k=v;k2=v2`) adds a genuine
    /// token for each that claims that label. Fails if the peer does not finish cleanly.
    pub fn rogue_peer(
        &self,
        bin: &str,
        from: &Host,
        keys: [&Path; 3],
        to: &Host,
        port: u16,
        claims: Option<&str>,
    ) -> Result<RogueAnswers> {
        let [ca, cert, key] = keys.map(|p| p.display().to_string());
        let tunnel = SocketAddr::from((to.addr, TUNNEL_PORT)).to_string();
        let dst = SocketAddr::from((to.addr, port)).to_string();
        let trust_domain = IdentityConfig::default().trust_domain;
        let mut args = vec![
            ca.as_str(),
            &cert,
            &key,
            &from.name,
            &to.name,
            &tunnel,
            &dst,
            &trust_domain,
        ];
        args.extend(claims);
        let out = self.run(from, None, bin, &args, Duration::from_secs(30))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "rogue peer failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let answers = stdout
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("rogue peer said {l:?}")))
            .collect::<Result<_>>()?;
        Ok(RogueAnswers { stdout, answers })
    }
}
