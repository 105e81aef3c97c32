//! The docker gate of a root `kiln` started with `--run-as` that offers
//! `docker` (see `kiln_container::gate`): started as root, before the
//! process becomes its user, as `kiln docker-gate`; the executor then
//! reaches the daemon only through it.
//!
//! Where it lives: a directory root makes under `/run` (mode 0711, the
//! starting process's pid in its name) holds the gate's socket (the user's,
//! mode 0600) and the pins of its binds. The gate ends when the process
//! that started it does (its stdin closes), releasing its pins; should it
//! end first, that process stops, as it does when its launchers are gone.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use kiln::isolation::IsolationSettings;

/// `kiln docker-gate`'s arguments, given by the process that starts it.
#[derive(clap::Args)]
pub struct DockerGateArgs {
    /// The socket to listen on (made here, given to `--client-uid`).
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's socket.
    #[arg(long)]
    upstream: PathBuf,
    /// The executor's `kiln.owner` label.
    #[arg(long)]
    owner: String,
    /// The executor's uid.
    #[arg(long)]
    client_uid: u32,
    /// A directory binds may come from (repeated).
    #[arg(long = "bind-root")]
    bind_roots: Vec<PathBuf>,
    /// Where binds are pinned.
    #[arg(long)]
    pins_dir: PathBuf,
    /// The nftables command.
    #[arg(long)]
    nft: PathBuf,
}

/// A gate started by this process: its pid, and the process itself for
/// [`watch`] to wait on. Its stdin stays open as long as this process
/// runs.
pub struct GateProcess {
    child: std::process::Child,
}

/// Starts the gate for a process that will be `uid` (still root here,
/// and single-threaded), whose containers carry `owner` and whose
/// workspaces are under `work_root`; points `settings` at it once it
/// listens.
pub fn start(
    settings: &mut IsolationSettings,
    owner: &str,
    uid: u32,
    work_root: &Path,
) -> anyhow::Result<GateProcess> {
    use std::os::unix::fs::PermissionsExt;
    let base = if Path::new("/run").is_dir() {
        PathBuf::from("/run")
    } else {
        std::env::temp_dir()
    };
    sweep(&base);
    let dir = base.join(format!("{PREFIX}{}", std::process::id()));
    remove_gate_dir(&dir);
    std::fs::create_dir(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)))
        .map_err(|e| anyhow::anyhow!("docker gate: making {}: {e}", dir.display()))?;
    let socket = dir.join("docker.sock");
    let agent_dir = kiln_container::warm::AgentFile::dir_for(uid);
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("/proc/self/exe")
        // A group of its own, as the launchers have: a terminal's Ctrl-C
        // stops the process, which then still removes its containers
        // through the gate, and the gate ends after it.
        .process_group(0)
        .arg(SUBCOMMAND)
        .arg("--socket")
        .arg(&socket)
        .arg("--upstream")
        .arg(&settings.docker_socket)
        .arg("--owner")
        .arg(owner)
        .arg("--client-uid")
        .arg(uid.to_string())
        .arg("--bind-root")
        .arg(work_root)
        .arg("--bind-root")
        .arg(&agent_dir)
        .arg("--pins-dir")
        .arg(dir.join("pins"))
        .arg("--nft")
        .arg(&settings.sandbox.nft_binary)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("docker gate: starting it: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.trim() != READY {
        let status = child.wait().ok();
        anyhow::bail!(
            "docker gate: it did not start (exit {status:?}; its log is above); --run-as with \
             docker needs it"
        );
    }
    settings.docker_socket = socket;
    settings.docker_gated = true;
    tracing::info!(pid = child.id(), socket = %settings.docker_socket.display(), "docker gate started");
    Ok(GateProcess { child })
}

/// Waits, on a thread of its own, for `gate` to end, and tells `gone`
/// why: the process cannot run docker actions without it.
pub fn watch(gate: GateProcess, gone: impl FnOnce(String) + Send + 'static) -> std::io::Result<()> {
    let GateProcess { mut child } = gate;
    // Held open for as long as this process runs: the gate's signal to end.
    let stdin = child.stdin.take();
    std::thread::Builder::new()
        .name("kiln-docker-gate".into())
        .spawn(move || {
            let status = child.wait();
            drop(stdin);
            gone(format!("the docker gate ended ({status:?})"));
        })?;
    Ok(())
}

/// The subcommand the gate runs as.
pub const SUBCOMMAND: &str = "docker-gate";
const READY: &str = "ready";

/// `kiln docker-gate`: serves until its stdin closes.
pub async fn run(args: DockerGateArgs) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .map_err(|e| anyhow::anyhow!("docker gate: listening on {}: {e}", args.socket.display()))?;
    std::fs::set_permissions(&args.socket, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(&args.socket, Some(args.client_uid), None)?;
    let config = kiln_container::gate::GateConfig {
        upstream: args.upstream,
        owner: args.owner,
        client_uid: args.client_uid,
        bind_roots: args.bind_roots,
        pins_dir: args.pins_dir.clone(),
        nft_binary: args.nft,
    };
    // Ready only once its roots are open: nothing of the user's runs
    // before the process that started it hears so.
    let gate = kiln_container::gate::DockerGate::start(config)
        .await
        .map_err(|e| anyhow::anyhow!("docker gate: {e}"));
    let gate = match gate {
        Ok(gate) => gate,
        Err(error) => {
            tracing::error!("{error:#}");
            std::process::exit(1);
        }
    };
    let serving = tokio::spawn(gate.serve(listener));
    println!("{READY}");
    let ended = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut sink = [0u8; 64];
        while std::io::stdin().read(&mut sink).is_ok_and(|n| n > 0) {}
    });
    let result = tokio::select! {
        _ = ended => Ok(()),
        served = serving => Err(anyhow::anyhow!("docker gate: stopped serving: {served:?}")),
    };
    if let Some(dir) = args.socket.parent() {
        remove_gate_dir(dir);
    }
    if let Err(error) = &result {
        // Not returned: the runtime would wait on the thread reading stdin.
        tracing::error!("{error:#}");
        std::process::exit(1);
    }
    Ok(())
}

/// The name of a gate's directory, before the pid of the process that
/// started it.
const PREFIX: &str = "kiln-docker-gate-";

/// Removes the gate directories under `base` of processes that are gone
/// (killed, so their gates could not clean up).
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_gate_dir(&entry.path());
            }
        }
    }
}

/// Removes a gate's directory: its pins released first, then each entry
/// alone (never recursively, which would follow a pin still mounted into
/// the workspace it pins).
fn remove_gate_dir(dir: &Path) {
    let pins = dir.join("pins");
    kiln_sandbox::pin::Pins::release_all(&pins);
    let _ = std::fs::remove_dir(&pins);
    let _ = std::fs::remove_file(dir.join("docker.sock"));
    let _ = std::fs::remove_dir(dir);
}
