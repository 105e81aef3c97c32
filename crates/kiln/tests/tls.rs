//! TLS on Kiln's gRPC port, end to end with certificates made here (a CA,
//! a server certificate for 127.0.0.1 and localhost, client certificates):
//! a real (upstream) Bazel builds remotely over `grpcs://` and hits the
//! remote cache after a clean, and its plaintext attempt against the TLS
//! port fails;
//! `kiln executor` processes connect with `--tls-ca` and refuse a server
//! certificate of another CA; with `--tls-client-ca` only executors with
//! a client certificate register (other clients need none); and a
//! plaintext server never sends a registry credential to an executor
//! beyond loopback (one in a network namespace the test makes), but waits
//! for one that may receive it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::remote::{self, completed, digest, wait_bounded};
use common::{Bazel, KilnServer, Process, ProcessSummary};
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::execution_stage;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Streaming;

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// A CA and certificates it signed, as PEM files in one directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA named `name`, with a server certificate for 127.0.0.1 and
    /// localhost and a client certificate, written under `dir/name`.
    fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair,
        };
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("Kiln test CA {name}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (leaf, names, usage) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["kiln-executor".to_string()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{name} {leaf}"));
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{leaf}-key.pem")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_string()
    }

    /// `kiln serve` flags serving TLS with this CA's server certificate.
    fn serve_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server-key.pem"),
        ]
    }

    /// `kiln executor` flags presenting this CA's client certificate.
    fn client_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("client.pem"),
            "--tls-key".into(),
            self.path("client-key.pem"),
        ]
    }
}

/// `kiln serve` without an embedded executor, in memory, on `listen`;
/// returns it and the scheme-and-address of its listening line.
fn serve(listen: &str, data_dir: &Path, extra: &[String]) -> (Process, String) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    common::serve_without_executor(listen, data_dir, &extra)
}

/// `kiln executor` in pool `procs` (one slot), run through `wrapper` (a
/// command prefix such as `ip netns exec NS`; empty: none).
fn spawn_executor(
    wrapper: &[&str],
    scheduler: &str,
    name: &str,
    work_dir: &Path,
    extra: &[String],
) -> Process {
    common::open_to_actions(work_dir);
    let mut command = Command::new(
        wrapper
            .first()
            .copied()
            .unwrap_or(env!("CARGO_BIN_EXE_kiln")),
    );
    if !wrapper.is_empty() {
        command.args(&wrapper[1..]).arg(env!("CARGO_BIN_EXE_kiln"));
    }
    command
        .args(common::executor_args(scheduler, name, work_dir))
        .args(extra);
    Process::spawn_command(command)
}

/// A channel to `address` (`grpc://` or `grpcs://` with `ca`), without a
/// client certificate.
async fn channel(address: &str, ca: Option<&Pki>) -> Channel {
    let endpoint = match address.strip_prefix("grpcs://") {
        Some(rest) => {
            let ca = std::fs::read(ca.expect("a CA for grpcs").path("ca.pem")).unwrap();
            Endpoint::from_shared(format!("https://{rest}"))
                .unwrap()
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
                .unwrap()
        }
        None => {
            let rest = address.strip_prefix("grpc://").unwrap();
            Endpoint::from_shared(format!("http://{rest}")).unwrap()
        }
    };
    endpoint.connect().await.unwrap()
}

/// Uploads an action running `script` in pool `procs` with platform
/// `properties` besides the pool, and executes it with `headers`.
async fn execute(
    channel: Channel,
    script: &str,
    properties: &[(&str, &str)],
    headers: &[(&'static str, &str)],
) -> Streaming<Operation> {
    let mut all = vec![("Pool", "procs")];
    all.extend_from_slice(properties);
    let arguments = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let action = remote::upload_action(&channel, arguments, None, vec![], &all).await;
    remote::execute(channel, action, true, headers)
        .await
        .unwrap()
}

/// Debian's Bazel 4.2.3 (`bazel-bootstrap`) cannot open a TLS channel at
/// all: its netty is built without ALPN for the JDK provider, and the
/// build crashes with "JDK provider does not support ALPN protocol"
/// before reaching any server. Upstream releases bundle their own TLS, so
/// this runs the upstream Bazel 2.1.0 that `scripts/install-deps.sh`
/// installs.
#[test]
fn bazel_builds_remotely_over_tls_and_its_plaintext_attempt_fails() {
    let Some(binary) = common::bazel2() else {
        return;
    };
    let scratch = tempfile::Builder::new()
        .prefix("kiln-tls-bazel-")
        .tempdir()
        .unwrap();
    let pki = Pki::new(scratch.path(), "trusted");
    let tls = pki.serve_flags();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let server = KilnServer::start(
        &scratch.path().join("kiln-data"),
        &scratch.path().join("kiln.log"),
        &tls,
    );
    assert!(server.tls, "the listening line says grpcs://");
    let remote = |scheme: &str| {
        vec![
            format!("--remote_executor={scheme}://127.0.0.1:{}", server.port),
            format!("--tls_certificate={}", pki.path("ca.pem")),
            "--spawn_strategy=remote".into(),
            "--genrule_strategy=remote".into(),
            // A failure is reported at once, not after minutes of retries.
            "--remote_retries=0".into(),
        ]
    };
    let bazel = Bazel::with_binary(
        &binary,
        "workspace-bazel2",
        &scratch.path().join("tls"),
        remote("grpcs"),
    );

    let first = bazel.run_ok(&["build", "//:shout"]);
    assert_eq!(ProcessSummary::parse(&first).count("remote"), 1, "{first}");
    assert_eq!(
        bazel.read_outputs(&["bazel-bin/shout.txt"])["bazel-bin/shout.txt"],
        b"HELLO FROM BAZEL 2.1\n"
    );

    bazel.run_ok(&["clean"]);
    let cached = bazel.run_ok(&["build", "//:shout"]);
    ProcessSummary::parse(&cached).assert_all_remote_cache_hits("the build over TLS after clean");

    // Plaintext against the TLS port: the build fails, with no fallback to
    // building here.
    let plaintext = Bazel::with_binary(
        &binary,
        "workspace-bazel2",
        &scratch.path().join("plain"),
        remote("grpc"),
    );
    let output = plaintext.run(&["build", "//:shout"]);
    let text = common::combined(&output);
    assert!(
        !output.status.success(),
        "a plaintext build against the TLS port succeeded:\n{text}"
    );
    assert!(
        !plaintext.workspace.join("bazel-bin/shout.txt").exists(),
        "the genrule's output exists after the failed plaintext build:\n{text}"
    );
}

#[tokio::test]
async fn an_executor_connects_with_its_ca_and_refuses_a_server_certificate_of_another_ca() {
    let scratch = tempfile::tempdir().unwrap();
    let trusted = Pki::new(scratch.path(), "trusted");
    let other = Pki::new(scratch.path(), "other");
    let (_server, address) = serve(
        "127.0.0.1:0",
        &scratch.path().join("server"),
        &trusted.serve_flags(),
    );
    assert!(address.starts_with("grpcs://127.0.0.1:"), "{address}");

    let wrong_ca = ["--tls-ca".to_string(), other.path("ca.pem")];
    let refusing = spawn_executor(
        &[],
        &address,
        "exec-other-ca",
        &scratch.path().join("other"),
        &wrong_ca,
    );
    let log = refusing.log_until_all(&["cannot register with the scheduler"]);
    let refusal = log.last().unwrap();
    assert!(
        refusal.contains("certificate") || refusal.contains("UnknownIssuer"),
        "the retry does not say the certificate is the problem: {refusal}"
    );
    drop(refusing);

    let right_ca = ["--tls-ca".to_string(), trusted.path("ca.pem")];
    let executor = spawn_executor(
        &[],
        &address,
        "exec-tls",
        &scratch.path().join("tls"),
        &right_ca,
    );
    executor.wait_for_log("executor registered");
    let response = completed(
        execute(
            channel(&address, Some(&trusted)).await,
            "echo over tls",
            &[],
            &[],
        )
        .await,
    )
    .await;
    let result = response.result.expect("a result");
    assert_eq!(result.stdout_digest, Some(digest(b"over tls\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "exec-tls");

    // A plaintext address with TLS flags is refused before connecting.
    let plaintext = address.replace("grpcs://", "grpc://");
    let mut refused = spawn_executor(
        &[],
        &plaintext,
        "exec-mixed",
        &scratch.path().join("mixed"),
        &right_ca,
    );
    refused.wait_for_log("use grpcs://");
    assert!(!wait_bounded(&mut refused.child).success());
}

#[tokio::test]
async fn with_a_client_ca_only_executors_with_a_client_certificate_register() {
    let scratch = tempfile::tempdir().unwrap();
    let server_pki = Pki::new(scratch.path(), "server");
    let executors = Pki::new(scratch.path(), "executors");
    let mut flags = server_pki.serve_flags();
    flags.extend(["--tls-client-ca".to_string(), executors.path("ca.pem")]);
    let (_server, address) = serve("127.0.0.1:0", &scratch.path().join("server"), &flags);
    let ca = ["--tls-ca".to_string(), server_pki.path("ca.pem")];

    let mut without = spawn_executor(
        &[],
        &address,
        "exec-anonymous",
        &scratch.path().join("anonymous"),
        &ca,
    );
    without.wait_for_log("client certificate");
    let status = wait_bounded(&mut without.child);
    assert!(
        !status.success(),
        "registered without a certificate: {status}"
    );

    let mut with = ca.to_vec();
    with.extend(executors.client_flags());
    let executor = spawn_executor(
        &[],
        &address,
        "exec-certified",
        &scratch.path().join("certified"),
        &with,
    );
    executor.wait_for_log("executor registered");
    // The test's own client presents no certificate: REAPI clients still
    // connect.
    let response = completed(
        execute(
            channel(&address, Some(&server_pki)).await,
            "echo certified",
            &[],
            &[],
        )
        .await,
    )
    .await;
    let result = response.result.expect("a result");
    assert_eq!(result.stdout_digest, Some(digest(b"certified\n")));
    assert_eq!(result.execution_metadata.unwrap().worker, "exec-certified");
}

/// A network namespace joined to this one by a veth pair: the host side
/// has `host`, the namespace side `inside`. Deleted when dropped.
struct Namespace {
    name: String,
    host_link: String,
    host: String,
    inside: String,
}

impl Namespace {
    fn create() -> Namespace {
        // Unique per test of this process, which run in parallel.
        static CREATED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 10_000 * 10 + n % 10;
        let subnet = (std::process::id() + n) % 250 + 1;
        let namespace = Namespace {
            name: format!("kiln-tls-{id}"),
            host_link: format!("ktls{id}h"),
            host: format!("10.213.{subnet}.1"),
            inside: format!("10.213.{subnet}.2"),
        };
        let inner_link = format!("ktls{id}n");
        let ip = |args: &[&str]| {
            let output = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                output.status.success(),
                "ip {}: {}",
                args.join(" "),
                common::combined(&output)
            );
        };
        ip(&["netns", "add", &namespace.name]);
        ip(&[
            "link",
            "add",
            &namespace.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &inner_link,
        ]);
        ip(&["link", "set", &inner_link, "netns", &namespace.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", namespace.host),
            "dev",
            &namespace.host_link,
        ]);
        ip(&["link", "set", &namespace.host_link, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&[
            "addr",
            "add",
            &format!("{}/30", namespace.inside),
            "dev",
            &inner_link,
        ]);
        inside(&["link", "set", &inner_link, "up"]);
        inside(&["link", "set", "lo", "up"]);
        namespace
    }
}

impl Namespace {
    /// `kiln executor` "exec-remote" (pools `procs`, `none` and `docker`)
    /// in the namespace, registered with the plaintext server at
    /// `address`: beyond loopback.
    fn executor(&self, address: &str, work_dir: &Path) -> Process {
        let wrapper = ["ip", "netns", "exec", self.name.as_str()];
        let isolation = ["--isolation".to_string(), "none,docker".to_string()];
        let executor = spawn_executor(&wrapper, address, "exec-remote", work_dir, &isolation);
        executor.wait_for_log("executor registered");
        executor
    }
}

/// Stops `processes` and checks that `secret` is in no line they logged.
fn assert_in_no_log<const N: usize>(secret: &str, processes: [&mut Process; N]) {
    for process in processes {
        let _ = process.child.kill();
        let _ = process.child.wait();
        while let Ok(line) = process.stderr.recv_timeout(HANG_GUARD) {
            assert!(!line.contains(secret), "the secret leaked: {line}");
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so both.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
    }
}

#[tokio::test]
async fn a_plaintext_server_sends_no_registry_credential_beyond_loopback() {
    if !common::root_available("a network namespace and a veth pair")
        || !common::runtime_available("docker")
    {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let namespace = Namespace::create();
    // Beyond loopback without API keys: allowed explicitly (the address is
    // the host end of the test's own veth pair).
    let (mut server, address) = serve(
        &format!("{}:0", namespace.host),
        &scratch.path().join("server"),
        &["--allow-unauthenticated".to_string()],
    );
    assert!(address.starts_with("grpc://"), "{address}");
    // The executor reaches the server from the namespace's address: not
    // loopback, and plaintext.
    let mut executor = namespace.executor(&address, &scratch.path().join("remote"));

    let secret = format!("kiln-secret-{}", std::process::id());
    // No executor of the pool may receive the credential, so the action is
    // refused when it is submitted, naming why.
    let channel_to_server = channel(&address, None).await;
    let arguments = vec!["/bin/sh".into(), "-c".into(), "true".into()];
    let action = remote::upload_action(
        &channel_to_server,
        arguments,
        None,
        vec![],
        &[
            ("Pool", "procs"),
            ("workload-isolation-type", "docker"),
            (
                "container-image",
                "docker://127.0.0.1:5000/kiln-test/base:latest",
            ),
        ],
    )
    .await;
    let status = remote::execute(
        channel_to_server,
        action,
        true,
        &[
            ("x-buildbuddy-platform.container-registry-username", "me"),
            (
                "x-buildbuddy-platform.container-registry-password",
                secret.as_str(),
            ),
        ],
    )
    .await
    .expect_err("an executor accepted a credential over plaintext beyond loopback");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("plaintext") && status.message().contains("registry credential"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(&secret), "{}", status.message());

    // Without a credential the same executor runs actions.
    let response =
        completed(execute(channel(&address, None).await, "echo fine", &[], &[]).await).await;
    let result = response.result.expect("a result");
    assert_eq!(result.stdout_digest, Some(digest(b"fine\n")));

    // The secret is in no log line of the server or the executor.
    assert_in_no_log(&secret, [&mut server, &mut executor]);
}

/// With a plaintext executor beyond loopback and the embedded executor in
/// one pool, an action with a registry credential waits for the embedded
/// one (which may receive it) instead of failing on the remote one.
#[tokio::test]
async fn a_registry_credential_waits_for_an_executor_that_may_receive_it() {
    if !common::root_available("a network namespace and a veth pair")
        || !common::runtime_available("docker")
    {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let namespace = Namespace::create();
    let embedded_work = scratch.path().join("server");
    common::open_to_actions(&embedded_work);
    let listen = format!("{}:0", namespace.host);
    let mut server = Process::spawn(&[
        "serve",
        "--monitoring-listen",
        "127.0.0.1:0",
        "--listen",
        &listen,
        "--data-dir",
        embedded_work.to_str().unwrap(),
        "--storage-backend",
        "memory",
        "--allow-unauthenticated",
        "--pool",
        "procs",
        "--concurrency",
        "1",
        "--isolation",
        "none,docker",
    ]);
    let line = server.stdout_line_with("listening ");
    let address = line["listening ".len()..].trim().to_string();
    let mut executor = namespace.executor(&address, &scratch.path().join("remote"));

    let secret = format!("kiln-secret-{}", std::process::id());
    let credential = [
        ("x-buildbuddy-platform.container-registry-username", "me"),
        (
            "x-buildbuddy-platform.container-registry-password",
            secret.as_str(),
        ),
    ];
    let image = [
        ("workload-isolation-type", "docker"),
        (
            "container-image",
            "docker://127.0.0.1:5000/kiln-test/base:latest",
        ),
    ];
    // The first fills the embedded executor's one slot; the second then
    // finds only the remote executor idle, and must wait rather than go
    // there.
    let mut first = execute(
        channel(&address, None).await,
        "sleep 3",
        &image,
        &credential,
    )
    .await;
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(operation) = first.message().await.unwrap() {
            if remote::stage(&operation) == execution_stage::Value::Executing {
                return;
            }
        }
        panic!("the first action ended before it was seen executing");
    })
    .await
    .expect("the first action never started");
    let second = completed(
        execute(
            channel(&address, None).await,
            "echo second",
            &image,
            &credential,
        )
        .await,
    )
    .await;
    let status = second.status.clone().unwrap_or_default();
    assert_eq!(status.code, 0, "{status:?}");
    let result = second.result.expect("a result");
    assert_eq!(result.stdout_digest, Some(digest(b"second\n")));
    let worker = result.execution_metadata.unwrap().worker;
    assert_ne!(worker, "exec-remote", "the credential went beyond loopback");
    let first = completed(first).await;
    assert_eq!(first.status.unwrap_or_default().code, 0);

    assert_in_no_log(&secret, [&mut server, &mut executor]);
}

#[test]
fn bad_tls_files_stop_the_server_naming_the_file() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = Pki::new(scratch.path(), "trusted");
    let junk = scratch.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n").unwrap();
    let missing = scratch.path().join("missing.pem");
    for (cert, key, named) in [
        (
            missing.to_str().unwrap().to_string(),
            pki.path("server-key.pem"),
            &missing,
        ),
        (
            junk.to_str().unwrap().to_string(),
            pki.path("server-key.pem"),
            &junk,
        ),
        (
            pki.path("server.pem"),
            junk.to_str().unwrap().to_string(),
            &junk,
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--monitoring-listen",
                "off",
            ])
            .args([
                "--storage-backend",
                "memory",
                "--embedded-executor",
                "false",
            ])
            .arg("--data-dir")
            .arg(scratch.path().join("data"))
            .args(["--tls-cert", &cert, "--tls-key", &key])
            .output()
            .unwrap();
        let text = common::combined(&output);
        assert!(
            !output.status.success(),
            "started with {cert} and {key}:\n{text}"
        );
        assert!(
            text.contains(named.to_str().unwrap()),
            "the error does not name {}:\n{text}",
            named.display()
        );
        assert!(!text.contains("listening"), "{text}");
    }
}
