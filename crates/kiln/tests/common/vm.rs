//! Shared by the Bazel tests of `firecracker` actions: a `kiln serve`
//! whose embedded executor offers VMs, with its VM files under the test's
//! scratch directory, and the check that nothing of a VM outlives it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::KilnServer;

/// A `kiln serve --isolation none,firecracker` whose VM run and cache
/// directories are under `scratch`.
pub struct VmServer {
    pub server: KilnServer,
    pub log: PathBuf,
    /// Where each VM's files live while it runs.
    pub run_dir: PathBuf,
}

impl VmServer {
    /// Starts it and checks it offers `firecracker` (QEMU and the guest
    /// kernel come from scripts/install-deps.sh).
    pub fn start(scratch: &Path, extra: &[&str]) -> VmServer {
        let log = scratch.join("kiln.log");
        let run_dir = scratch.join("run");
        let cache_dir = scratch.join("vm-cache");
        let mut args = vec![
            "--isolation",
            "none,firecracker",
            "--vm-run-dir",
            run_dir.to_str().unwrap(),
            "--vm-cache-dir",
            cache_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let server = KilnServer::start(&scratch.join("kiln-data"), &log, &args);
        let server = VmServer {
            server,
            log,
            run_dir,
        };
        assert!(
            server
                .log_text()
                .contains("isolation type offered isolation=firecracker"),
            "the server does not offer firecracker (QEMU and the guest kernel come from \
             scripts/install-deps.sh):\n{}",
            server.log_text()
        );
        server
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server with SIGTERM, and checks it exited cleanly and left
    /// no QEMU process and no VM file behind; its whole log.
    pub fn stop_and_check_nothing_left(self) -> String {
        let status = self.server.terminate(std::time::Duration::from_secs(60));
        assert!(status.success(), "kiln serve exited with {status}");
        assert_eq!(qemu_processes_under(&self.run_dir), Vec::<String>::new());
        let left: Vec<_> = fs::read_dir(&self.run_dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "VM files left behind: {left:?}");
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The QEMU processes whose command line names `dir`.
pub fn qemu_processes_under(dir: &Path) -> Vec<String> {
    let output = Command::new("pgrep")
        .args(["-a", "-f", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("qemu"))
        .map(str::to_string)
        .collect()
}

/// The value of the `KEY=VALUE` line for `key` in an action's report.
pub fn value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
        .trim()
        .to_string()
}
