//! Real containers on test hosts: podman (Debian's) with its Docker-compatible API served on
//! a socket of the test's own, an image imported from Debian's busybox-static (no registry),
//! containers run in a test host's network namespace under a parent cgroup of the test's.
//!
//! Everything the [`Podman`] guard made — containers, the image, the API service — goes
//! when it is dropped (drop it before the [`TestNet`] whose namespaces the containers use).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, TestNet, sh, which};

/// The static busybox of Debian's `busybox-static`: the whole root filesystem of the image.
pub const BUSYBOX: &str = "/bin/busybox";

/// Podman for one test: its API service and what it ran.
pub struct Podman {
    /// The API socket the enforcer follows.
    pub socket: PathBuf,
    /// The image every container runs: `localhost/tessera-test-<id>:1`.
    pub image: String,
    /// A label on every container of this test (for clean-up).
    tag: String,
    service: Option<Child>,
    /// `--hooks-dir` of every container run from now on ([`Self::install_hook`]).
    hooks_dir: Option<PathBuf>,
}

/// podman's flags that work in this sandbox: runc (crun refuses hybrid cgroups) and
/// explicit limits (podman's defaults exceed the sandbox's).
const RUN_FLAGS: [&str; 6] = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn podman(args: &[&str]) -> Result<Output> {
    Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("podman {}", args.join(" ")))
}

fn podman_ok(args: &[&str]) -> Result<String> {
    let out = podman(args)?;
    if !out.status.success() {
        bail!(
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `podman ARGS` (a `run` of container `name`) to its end, at most `limit`.
fn run_to_end(args: &[String], name: &str, limit: Duration) -> Result<Output> {
    let mut child = Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = podman(&["rm", "-f", "-t", "0", name]);
            let _ = child.kill();
            bail!("container {name} still running after {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

impl Podman {
    /// Imports the test image and starts the API service on a socket in the net's
    /// directory. Fails (never skips) when podman or busybox-static is missing.
    pub fn start(net: &TestNet) -> Result<Self> {
        for tool in ["podman", "runc"] {
            if which(tool).is_none() {
                bail!("{tool} is missing: run `cargo xtask setup` (Debian packages podman, runc)");
            }
        }
        if !Path::new(BUSYBOX).exists() {
            bail!("{BUSYBOX} is missing: run `cargo xtask setup` (Debian package busybox-static)");
        }
        let tag = format!("tessera-test-{}", net.id);
        let image = format!("localhost/{tag}:1");
        let root = net.dir.join("image-root");
        fs::create_dir_all(root.join("bin"))?;
        fs::copy(BUSYBOX, root.join("bin/busybox"))?;
        for applet in ["sh", "wget", "nc", "sleep", "httpd", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        // What `httpd -h /www` serves.
        fs::create_dir_all(root.join("www"))?;
        fs::write(root.join("www/index.html"), "hello from a container\n")?;
        let tar = net.dir.join("image.tar");
        sh(
            "tar",
            &[
                "-C",
                root.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        )?;
        let mut me = Self {
            socket: net.dir.join("podman.sock"),
            image: image.clone(),
            tag,
            service: None,
            hooks_dir: None,
        };
        podman_ok(&["import", tar.to_str().unwrap(), &image])?;
        let log = fs::File::create(net.dir.join("podman-service.log"))?;
        let child = Command::new("podman")
            .args([
                "system",
                "service",
                "--time=0",
                &format!("unix://{}", me.socket.display()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("podman system service")?;
        me.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.socket.exists() {
            if Instant::now() > deadline {
                bail!("podman's API socket {} did not appear", me.socket.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// Another image of the same root filesystem whose author set `labels` (`LABEL`); its
    /// name. Removed with the guard.
    pub fn image_with_labels(&self, net: &TestNet, labels: &[(&str, &str)]) -> Result<String> {
        let image = format!("localhost/{}-labelled:1", self.tag);
        let mut args = vec!["import".to_string()];
        for (k, v) in labels {
            args.push("--change".into());
            args.push(format!("LABEL {k}={v}"));
        }
        args.push(net.dir.join("image.tar").display().to_string());
        args.push(image.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&args)?;
        Ok(image)
    }

    /// Like [`Self::run`], from `image`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_image(
        &self,
        image: &str,
        host: &Host,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        cmd: &[&str],
        limit: Duration,
    ) -> Result<Output> {
        let network = format!("ns:/run/netns/{}", host.netns);
        let args = self.run_args(image, &network, parent, name, labels, false, &[], cmd)?;
        run_to_end(&args, name, limit)
    }

    /// An enforcer's `[containers]` section following this podman for containers under
    /// `parent` (every one of them: no `select`, no ports).
    pub fn section(&self, parent: &Path) -> tessera_enforcer::config::Containers {
        tessera_enforcer::config::Containers {
            runtime: Default::default(),
            kubernetes: None,
            hook_socket: None,
            socket: self.socket.clone(),
            cgroup: parent.to_owned(),
            name: "containers".into(),
            select: Default::default(),
            observe: false,
            wait_ms: 5_000,
            ports: Vec::new(),
        }
    }

    /// Installs `tessera oci-hook --socket SOCKET` (the binary `bin`) as a `prestart` OCI
    /// hook of every container this guard runs from now on (`--hooks-dir`, in `dir`).
    pub fn install_hook(&mut self, dir: &Path, bin: &Path, socket: &Path) -> Result<()> {
        let hooks = dir.join("hooks.d");
        fs::create_dir_all(&hooks)?;
        let hook = serde_json::json!({
            "version": "1.0.0",
            "hook": {"path": bin, "args": ["tessera", "oci-hook", "--socket", socket]},
            "when": {"always": true},
            "stages": ["prestart"],
        });
        fs::write(hooks.join("tessera.json"), hook.to_string())?;
        self.hooks_dir = Some(hooks);
        Ok(())
    }

    /// Stops the API service (the runtime "goes away"); containers keep running.
    pub fn stop_service(&mut self) {
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }

    /// The image's manifest digest as podman reports it (`sha256:…`).
    pub fn image_digest(&self) -> Result<String> {
        podman_ok(&["image", "inspect", "--format", "{{.Digest}}", &self.image])
    }

    /// The `--cgroup-parent` value for a parent cgroup directory (relative to the mount).
    fn cgroup_parent(parent: &Path) -> Result<String> {
        let mount = crate::cgroup2_mount()?;
        Ok(format!(
            "/{}",
            parent
                .strip_prefix(&mount)
                .context("the parent cgroup is not under the cgroup v2 mount")?
                .display()
        ))
    }

    /// Runs `cmd` in a new container `name` on `host`'s network, under `parent`, with
    /// `labels`, to completion (bounded by `limit`); its output.
    pub fn run(
        &self,
        host: &Host,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        cmd: &[&str],
        limit: Duration,
    ) -> Result<Output> {
        let network = format!("ns:/run/netns/{}", host.netns);
        self.run_with_network(parent, name, labels, &network, cmd, limit)
    }

    /// Like [`Self::run`], on podman's `--network` `network` (`none`, `ns:…`).
    pub fn run_with_network(
        &self,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        network: &str,
        cmd: &[&str],
        limit: Duration,
    ) -> Result<Output> {
        let args = self.run_args(&self.image, network, parent, name, labels, false, &[], cmd)?;
        run_to_end(&args, name, limit)
    }

    /// Starts `cmd` in a detached container `name`; its id.
    pub fn start_detached(
        &self,
        host: &Host,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        cmd: &[&str],
    ) -> Result<String> {
        self.start_exposing(host, parent, name, labels, &[], cmd)
    }

    /// Like [`Self::start_detached`], the container saying it serves `ports` (`--expose`).
    pub fn start_exposing(
        &self,
        host: &Host,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[u16],
        cmd: &[&str],
    ) -> Result<String> {
        let network = format!("ns:/run/netns/{}", host.netns);
        self.start_on(&network, parent, name, labels, ports, cmd)
    }

    /// Starts a detached container on podman's `--network` `network`; its id.
    pub fn start_on(
        &self,
        network: &str,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[u16],
        cmd: &[&str],
    ) -> Result<String> {
        let args = self.run_args(&self.image, network, parent, name, labels, true, ports, cmd)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&args)
    }

    /// Stops and removes container `name`.
    pub fn remove(&self, name: &str) -> Result<()> {
        podman_ok(&["rm", "-f", "-t", "0", name]).map(|_| ())
    }

    /// Runs `cmd` in the running container `name` (a new process in its cgroup).
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<Output> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        podman(&args)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_args(
        &self,
        image: &str,
        network: &str,
        parent: &Path,
        name: &str,
        labels: &[(&str, &str)],
        detached: bool,
        expose: &[u16],
        cmd: &[&str],
    ) -> Result<Vec<String>> {
        // `--hooks-dir` is podman's own option, before the command.
        let mut args: Vec<String> = match &self.hooks_dir {
            Some(hooks) => vec!["--hooks-dir".into(), hooks.display().to_string()],
            None => Vec::new(),
        };
        args.push("run".into());
        if detached {
            args.push("-d".into());
        } else {
            args.push("--rm".into());
        }
        args.extend(RUN_FLAGS.iter().map(|s| s.to_string()));
        args.extend([
            "--name".into(),
            name.into(),
            "--label".into(),
            format!("tessera-test={}", self.tag),
            "--network".into(),
            network.into(),
            "--cgroup-parent".into(),
            Self::cgroup_parent(parent)?,
        ]);
        for p in expose {
            args.push("--expose".into());
            args.push(p.to_string());
        }

        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push(image.to_owned());
        args.extend(cmd.iter().map(|s| s.to_string()));
        Ok(args)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Ok(ids) = podman_ok(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=tessera-test={}", self.tag),
        ]) {
            for id in ids.split_whitespace() {
                let _ = podman(&["rm", "-f", "-t", "0", id]);
            }
        }
        let _ = podman(&["rmi", "-f", &self.image]);
        let _ = podman(&["rmi", "-f", &format!("localhost/{}-labelled:1", self.tag)]);
        self.stop_service();
    }
}
