//! API keys against a real `kiln serve`: keys made, listed and revoked
//! with `kiln keys` while the server runs; real Bazel 4.2.3 with
//! `--remote_header=x-buildbuddy-api-key=…` on the organisation's own
//! executor (registered with its key); a CAS-only key whose Action Cache
//! writes are refused while the build succeeds; two organisations that
//! share neither results nor blobs, and whose own executors run only
//! their own `use-self-hosted-executors` actions; capabilities and
//! revocation through a gRPC client; and a network address that needs
//! keys.

mod common;

use common::remote::{self, with_key};
use common::{combined, Bazel, KilnServer, Process, ProcessSummary};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{self, batch_update_blobs_request};
use tonic::transport::Channel;

/// Upper bound for anything that could hang; never a pass/fail threshold.
const HANG_GUARD: Duration = Duration::from_secs(60);

const BUILD: &str = r#"
genrule(
    name = "greeting",
    outs = ["greeting.txt"],
    cmd = "echo 'hello from an authenticated build' > $@",
)

genrule(
    name = "shout",
    srcs = [":greeting"],
    outs = ["shout.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)
"#;

/// `kiln keys ARGS --data-dir DIR`; its stdout, or a panic with both.
fn keys(data_dir: &Path, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("keys")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("kiln keys runs");
    let text = combined(&output);
    assert!(output.status.success(), "kiln keys {args:?}: {text}");
    String::from_utf8(output.stdout).unwrap()
}

/// A new key of `org` with `capabilities`: (its id, the key).
fn create_key(data_dir: &Path, org: &str, capabilities: &str) -> (String, String) {
    let out = keys(
        data_dir,
        &["create", "--org", org, "--capability", capabilities],
    );
    let key = out.lines().last().expect("the key's line").to_string();
    let id = out
        .split_whitespace()
        .nth(2)
        .expect("created key ID …")
        .to_string();
    assert!(key.starts_with(&format!("kiln_{id}_")), "{out}");
    (id, key)
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to kiln")
}

async fn get_capabilities(channel: &Channel, key: Option<&str>) -> Result<(), tonic::Status> {
    CapabilitiesClient::new(channel.clone())
        .get_capabilities(with_key(reapi::GetCapabilitiesRequest::default(), key))
        .await
        .map(drop)
}

async fn upload(channel: &Channel, key: Option<&str>, data: &[u8]) -> Result<(), tonic::Status> {
    let digest = remote::digest(data);
    ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(with_key(
            reapi::BatchUpdateBlobsRequest {
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(digest),
                    data: data.to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            key,
        ))
        .await
        .map(drop)
}

/// Waits (bounded) until `check` holds; returns how long that took.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < HANG_GUARD, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn keys_made_while_the_server_runs_close_it_and_revoked_ones_stop_working() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let server = KilnServer::start(&data_dir, &scratch.path().join("kiln.log"), &[]);
    let channel = channel(server.port).await;

    // Open on loopback until a key exists, the monitoring endpoint too.
    get_capabilities(&channel, None).await.unwrap();
    upload(&channel, None, b"before any key").await.unwrap();
    let page = |path: &str, headers: &[&str]| {
        common::http_get_with(server.monitoring_port, path, headers).unwrap()
    };
    assert_eq!(page("/metrics", &[]).0, 200);

    let (reader_id, reader) = create_key(&data_dir, "acme", "cache-read");
    let (writer_id, writer) = create_key(&data_dir, "acme", "cache-read,cas-write");
    // The server reads the key file again within a quarter second; it may
    // see the first key before the second.
    let took = eventually("the server knows both keys", || async {
        get_capabilities(&channel, None).await.is_err()
            && get_capabilities(&channel, Some(&writer)).await.is_ok()
    })
    .await;
    eprintln!("keys required {took:?} after kiln keys create returned");

    let refused = get_capabilities(&channel, None).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("x-buildbuddy-api-key"),
        "{refused:?}"
    );
    let wrong = get_capabilities(&channel, Some("kiln_000000000000_nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);

    // A key may what its capabilities say, and nothing else.
    get_capabilities(&channel, Some(&reader)).await.unwrap();
    let denied = upload(&channel, Some(&reader), b"no cas-write")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("cas-write"), "{denied:?}");
    assert!(
        !denied.message().contains(&reader),
        "the key is in {denied:?}"
    );
    upload(&channel, Some(&writer), b"with cas-write")
        .await
        .unwrap();

    // The monitoring endpoint shares the keys: health stays open, the rest
    // needs cache-read, sent as on the gRPC port or as a browser's Basic
    // password.
    assert_eq!(page("/healthz", &[]).0, 200);
    assert_eq!(page("/readyz", &[]).0, 200);
    for path in ["/metrics", "/", "/operations"] {
        let (status, body) = page(path, &[]);
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = page(path, &["x-buildbuddy-api-key: kiln_000000000000_nope"]);
        assert_eq!(status, 401, "{path} with a wrong key");
    }
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("anyone:{reader}"))
    };
    for header in [
        format!("x-buildbuddy-api-key: {reader}"),
        format!("Authorization: Bearer {reader}"),
        format!("Authorization: Basic {basic}"),
    ] {
        let (status, body) = page("/metrics", &[&header]);
        assert_eq!(status, 200, "{header}: {body}");
        assert!(body.contains("kiln_grpc_requests_total"));
    }

    // `kiln bench` measures a server with keys when given one.
    let bench = |key_file: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args([
            "bench",
            "exec",
            "--server",
            &format!("grpc://127.0.0.1:{}", server.port),
            "--latency-count",
            "2",
            "--throughput-count",
            "0",
        ]);
        if let Some(file) = key_file {
            command.arg("--api-key-file").arg(file);
        }
        command.output().unwrap()
    };
    let (_, runner) = create_key(&data_dir, "acme", "cache-read,cas-write,execute");
    let runner_file = scratch.path().join("runner.key");
    std::fs::write(&runner_file, &runner).unwrap();
    eventually("the bench key is known", || async {
        get_capabilities(&channel, Some(&runner)).await.is_ok()
    })
    .await;
    let keyed = bench(Some(&runner_file));
    assert!(keyed.status.success(), "{}", combined(&keyed));
    let keyless = bench(None);
    assert!(!keyless.status.success());
    assert!(
        combined(&keyless).contains("API key"),
        "{}",
        combined(&keyless)
    );

    // `kiln keys list` shows both by id, never the keys.
    let listed = keys(&data_dir, &["list"]);
    assert!(
        listed.contains(&reader_id) && listed.contains(&writer_id),
        "{listed}"
    );
    assert!(
        !listed.contains(&reader) && !listed.contains(&writer),
        "{listed}"
    );

    // Revoked: refused on the running server, the other key unaffected.
    let revoked = keys(&data_dir, &["revoke", &writer_id]);
    assert!(revoked.contains(&writer_id), "{revoked}");
    let took = eventually("the revoked key is refused", || async {
        upload(&channel, Some(&writer), b"after revocation")
            .await
            .is_err_and(|status| status.code() == tonic::Code::Unauthenticated)
    })
    .await;
    eprintln!("revoked key refused {took:?} after kiln keys revoke returned");
    get_capabilities(&channel, Some(&reader)).await.unwrap();
    assert!(keys(&data_dir, &["list"]).contains("revoked"));

    // Revoking every key leaves the server closed, not open again.
    keys(&data_dir, &["revoke", &reader_id]);
    eventually("the last revoked key is refused", || async {
        get_capabilities(&channel, Some(&reader)).await.is_err()
    })
    .await;
    assert!(get_capabilities(&channel, None).await.is_err());

    drop(server);
    common::assert_nowhere(&reader, &[&scratch.path().join("kiln.log")], &[&data_dir]);
}

#[test]
fn bazel_builds_with_api_keys_on_an_executor_registered_with_its_own() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let log = scratch.path().join("kiln.log");
    let (_, developer) = create_key(&data_dir, "acme", "cache-read,cas-write,execute");
    let (_, fleet) = create_key(&data_dir, "acme", "register-executor");
    let server = KilnServer::start(&data_dir, &log, &["--embedded-executor", "false"]);
    let scheduler = format!("grpc://127.0.0.1:{}", server.port);

    // An executor without a credential is refused and says why.
    let work = scratch.path().join("executors");
    for dir in ["none", "keyed"] {
        common::open_to_actions(&work.join(dir));
    }
    let executor = |name: &str, extra: &[&str]| {
        let dir = work.join(name);
        let mut args = vec![
            "executor",
            "--scheduler",
            &scheduler,
            "--name",
            name,
            "--capacity",
            "2",
            "--work-dir",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Process::spawn(&args)
    };
    let mut refused = executor("none", &[]);
    refused.wait_for_log("requires an API key");
    let status = refused.child.wait().unwrap();
    assert!(!status.success(), "an executor without a key ran: {status}");

    let key_file = scratch.path().join("executor.key");
    std::fs::write(&key_file, format!("{fleet}\n")).unwrap();
    let keyed = executor("keyed", &["--api-key-file", key_file.to_str().unwrap()]);
    keyed.wait_for_log("executor registered");

    // An executor registered with the organisation's key is its own: its
    // actions ask for it.
    let header = format!("--remote_header=x-buildbuddy-api-key={developer}");
    let mut flags = common::remote_only_flags(server.port);
    flags.push(header);
    flags.push("--remote_default_exec_properties=use-self-hosted-executors=true".into());
    let bazel = Bazel::new(scratch.path(), flags);
    let package = bazel.workspace.join("auth");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("BUILD"), BUILD).unwrap();

    let first = bazel.run_ok(&["build", "//auth:shout"]);
    assert_eq!(
        ProcessSummary::parse(&first).count("remote"),
        2,
        "both actions run on the executor:\n{first}"
    );
    let shout = std::fs::read_to_string(bazel.workspace.join("bazel-bin/auth/shout.txt")).unwrap();
    assert_eq!(shout, "HELLO FROM AN AUTHENTICATED BUILD\n");
    bazel.run_ok(&["clean"]);
    let again = bazel.run_ok(&["build", "//auth:shout"]);
    ProcessSummary::parse(&again).assert_all_remote_cache_hits("the rebuild with the key");

    // The same build without the key is refused, and says so.
    let keyless = Bazel::new(
        &scratch.path().join("keyless"),
        common::remote_only_flags(server.port),
    );
    std::fs::create_dir_all(keyless.workspace.join("auth")).unwrap();
    std::fs::write(keyless.workspace.join("auth/BUILD"), BUILD).unwrap();
    let output = keyless.run(&["build", "//auth:shout"]);
    let text = combined(&output);
    assert!(!output.status.success(), "built without a key:\n{text}");
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
    keyless.run_ok(&["shutdown"]);

    bazel.run_ok(&["shutdown"]);
    drop(keyed);
    drop(server);
    common::assert_nowhere(&developer, &[&log], &[&data_dir, &work]);
    common::assert_nowhere(&fleet, &[&log], &[&data_dir, &work]);
}

#[test]
fn a_cas_only_key_cannot_write_the_action_cache_yet_the_build_succeeds() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let (_, cas_only) = create_key(&data_dir, "acme", "cache-read,cas-write");
    let (_, ci) = create_key(&data_dir, "acme", "cache-read,cas-write,ac-write");
    let server = KilnServer::start(&data_dir, &scratch.path().join("kiln.log"), &[]);

    // Bazel runs the actions itself and uploads their results
    // (--remote_upload_local_results is on by default).
    let build_with = |key: &str, dir: &str| -> (String, String) {
        let bazel = Bazel::new(
            &scratch.path().join(dir),
            vec![
                format!("--remote_cache=grpc://127.0.0.1:{}", server.port),
                format!("--remote_header=x-buildbuddy-api-key={key}"),
                "--spawn_strategy=local".into(),
                "--genrule_strategy=local".into(),
            ],
        );
        std::fs::create_dir_all(bazel.workspace.join("auth")).unwrap();
        std::fs::write(bazel.workspace.join("auth/BUILD"), BUILD).unwrap();
        let first = bazel.run_ok(&["build", "//auth:shout"]);
        bazel.run_ok(&["clean"]);
        let second = bazel.run_ok(&["build", "//auth:shout"]);
        bazel.run_ok(&["shutdown"]);
        (first, second)
    };

    // The CAS-only key: the build succeeds, its results are not cached.
    let (first, second) = build_with(&cas_only, "cas-only");
    assert!(
        first.contains("PERMISSION_DENIED") && first.contains("ac-write"),
        "Bazel was not told why its upload failed:\n{first}"
    );
    let summary = ProcessSummary::parse(&second);
    assert_eq!(
        summary.count("remote cache hit"),
        0,
        "a CAS-only key wrote the Action Cache:\n{second}"
    );
    // A key that may write the Action Cache: the rebuild hits it.
    let (_, second) = build_with(&ci, "ci");
    ProcessSummary::parse(&second).assert_all_remote_cache_hits("the rebuild with ac-write");
}

/// Which of `digests` FindMissingBlobs reports missing to `key`'s caller.
async fn missing_for(
    channel: &Channel,
    key: &str,
    digests: &[reapi::Digest],
) -> Vec<reapi::Digest> {
    ContentAddressableStorageClient::new(channel.clone())
        .find_missing_blobs(with_key(
            reapi::FindMissingBlobsRequest {
                blob_digests: digests.to_vec(),
                ..Default::default()
            },
            Some(key),
        ))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

#[test]
fn two_organisations_share_neither_results_nor_blobs() {
    if !common::bazel_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let (_, acme) = create_key(&data_dir, "acme", "cache-read,cas-write,execute");
    let (_, globex) = create_key(&data_dir, "globex", "cache-read,cas-write,execute");
    let fleet_token = format!("fleet-token-{}", std::process::id());
    let token_file = scratch.path().join("executor-token");
    std::fs::write(&token_file, &fleet_token).unwrap();
    let server = KilnServer::start(
        &data_dir,
        &scratch.path().join("kiln.log"),
        &["--executor-token-file", token_file.to_str().unwrap()],
    );

    let build_as = |key: &str, dir: &str| -> (String, String) {
        let mut flags = common::remote_only_flags(server.port);
        flags.push(format!("--remote_header=x-buildbuddy-api-key={key}"));
        let bazel = Bazel::new(&scratch.path().join(dir), flags);
        std::fs::create_dir_all(bazel.workspace.join("auth")).unwrap();
        std::fs::write(bazel.workspace.join("auth/BUILD"), BUILD).unwrap();
        let first = bazel.run_ok(&["build", "//auth:shout"]);
        bazel.run_ok(&["clean"]);
        let again = bazel.run_ok(&["build", "//auth:shout"]);
        bazel.run_ok(&["shutdown"]);
        (first, again)
    };
    let (first, again) = build_as(&acme, "acme");
    assert_eq!(ProcessSummary::parse(&first).count("remote"), 2, "{first}");
    ProcessSummary::parse(&again).assert_all_remote_cache_hits("acme's rebuild");
    // The same targets for another organisation: nothing of acme's is a
    // hit; both actions run again, and then hit globex's own results.
    let (first, again) = build_as(&globex, "globex");
    let summary = ProcessSummary::parse(&first);
    assert_eq!(
        summary.count("remote cache hit"),
        0,
        "acme's results served to globex:\n{first}"
    );
    assert_eq!(summary.count("remote"), 2, "{first}");
    ProcessSummary::parse(&again).assert_all_remote_cache_hits("globex's rebuild");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = channel(server.port).await;
        // A blob only acme uploaded does not exist for globex.
        let secret = format!("acme's alone {}", std::process::id()).into_bytes();
        let blob = remote::digest(&secret);
        upload(&channel, Some(&acme), &secret).await.unwrap();
        assert!(missing_for(&channel, &acme, std::slice::from_ref(&blob))
            .await
            .is_empty());
        let missing = missing_for(&channel, &globex, std::slice::from_ref(&blob)).await;
        assert_eq!(missing, std::slice::from_ref(&blob));
        // The fleet's executor sees every blob, and asks as an action's
        // organisation whether a VM's output is held: then it sees what
        // that organisation sees. A key cannot widen its view that way.
        let fleet = |org: Option<&str>| {
            let mut request = tonic::Request::new(reapi::FindMissingBlobsRequest {
                blob_digests: vec![blob.clone()],
                ..Default::default()
            });
            let metadata = request.metadata_mut();
            metadata.insert(
                "authorization",
                format!("Bearer {fleet_token}").parse().unwrap(),
            );
            if let Some(org) = org {
                metadata.insert("x-kiln-for-org", org.parse().unwrap());
            }
            request
        };
        let cas = ContentAddressableStorageClient::new(channel.clone());
        for (org, expect_missing) in [(None, false), (Some("acme"), false), (Some("globex"), true)]
        {
            let missing = cas
                .clone()
                .find_missing_blobs(fleet(org))
                .await
                .unwrap()
                .into_inner()
                .missing_blob_digests;
            assert_eq!(
                !missing.is_empty(),
                expect_missing,
                "the fleet asking as {org:?}"
            );
        }
        let mut widen = with_key(
            reapi::FindMissingBlobsRequest {
                blob_digests: vec![blob.clone()],
                ..Default::default()
            },
            Some(&globex),
        );
        widen
            .metadata_mut()
            .insert("x-kiln-for-org", "acme".parse().unwrap());
        let missing = cas
            .clone()
            .find_missing_blobs(widen)
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests;
        assert_eq!(missing, std::slice::from_ref(&blob), "globex naming acme");
        let read = ContentAddressableStorageClient::new(channel.clone())
            .batch_read_blobs(with_key(
                reapi::BatchReadBlobsRequest {
                    digests: vec![blob.clone()],
                    ..Default::default()
                },
                Some(&globex),
            ))
            .await
            .unwrap()
            .into_inner();
        let status = read.responses[0].status.clone().unwrap();
        assert_eq!(status.code, tonic::Code::NotFound as i32, "{status:?}");
        assert!(read.responses[0].data.is_empty());
        let stream = ByteStreamClient::new(channel.clone())
            .read(with_key(
                ReadRequest {
                    resource_name: format!("blobs/{}/{}", blob.hash, blob.size_bytes),
                    ..Default::default()
                },
                Some(&globex),
            ))
            .await;
        let status = match stream {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        // The web UI does not serve it to globex either.
        let path = format!("/blob/{}/{}", blob.hash, blob.size_bytes);
        let as_key = |key: &str| format!("x-buildbuddy-api-key: {key}");
        let (code, _) =
            common::http_get_with(server.monitoring_port, &path, &[&as_key(&globex)]).unwrap();
        assert_eq!(code, 404);
        let (code, body) =
            common::http_get_with(server.monitoring_port, &path, &[&as_key(&acme)]).unwrap();
        assert_eq!(code, 200);
        assert!(
            body.ends_with(std::str::from_utf8(&secret).unwrap()),
            "{body}"
        );
        // Once globex sends the bytes, it has the blob too.
        upload(&channel, Some(&globex), &secret).await.unwrap();
        assert!(missing_for(&channel, &globex, std::slice::from_ref(&blob))
            .await
            .is_empty());
    });
}

/// Uploads an action running `script` with `properties`, as `key`'s
/// caller; its digest.
async fn upload_action_as(
    channel: &Channel,
    key: &str,
    script: &str,
    properties: &[(&str, &str)],
) -> reapi::Digest {
    let arguments = vec!["/bin/sh".into(), "-c".into(), script.into()];
    remote::upload_action_as(channel, Some(key), arguments, None, vec![], properties).await
}

/// Executes `action` as `key`'s caller: its response, or the refusal.
async fn execute_as(
    channel: &Channel,
    key: &str,
    action: reapi::Digest,
) -> Result<reapi::ExecuteResponse, tonic::Status> {
    let headers = [("x-buildbuddy-api-key", key)];
    let stream = remote::execute(channel.clone(), action, true, &headers).await?;
    Ok(remote::completed(stream).await)
}

#[tokio::test]
async fn an_organisations_own_executor_runs_only_its_self_hosted_actions() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let (_, acme) = create_key(&data_dir, "acme", "cache-read,cas-write,execute");
    let (_, acme_fleet) = create_key(&data_dir, "acme", "register-executor");
    let (_, globex) = create_key(&data_dir, "globex", "cache-read,cas-write,execute");
    // The embedded executor is the shared fleet.
    let server = KilnServer::start(&data_dir, &scratch.path().join("kiln.log"), &[]);
    let work = scratch.path().join("acme-executor");
    common::open_to_actions(&work);
    let key_file = scratch.path().join("acme.key");
    std::fs::write(&key_file, format!("{acme_fleet}\n")).unwrap();
    let scheduler = format!("grpc://127.0.0.1:{}", server.port);
    let executor = Process::spawn(&[
        "executor",
        "--scheduler",
        &scheduler,
        "--name",
        "acme-own",
        "--work-dir",
        work.to_str().unwrap(),
        "--api-key-file",
        key_file.to_str().unwrap(),
    ]);
    executor.wait_for_log("executor registered");
    let channel = channel(server.port).await;

    let worker = |response: &reapi::ExecuteResponse| -> String {
        let status = response.status.clone().unwrap_or_default();
        assert_eq!(status.code, 0, "{status:?}");
        let result = response.result.clone().expect("a result");
        result.execution_metadata.unwrap().worker
    };
    let self_hosted = [("use-self-hosted-executors", "true")];
    for round in 0..3 {
        let script = format!("echo own {round}");
        let action = upload_action_as(&channel, &acme, &script, &self_hosted).await;
        let response = execute_as(&channel, &acme, action).await.unwrap();
        assert_eq!(worker(&response), "acme-own", "round {round}");
        let script = format!("echo shared {round}");
        let action = upload_action_as(&channel, &acme, &script, &[]).await;
        let response = execute_as(&channel, &acme, action).await.unwrap();
        assert_ne!(
            worker(&response),
            "acme-own",
            "the shared fleet's action ran on acme's own executor"
        );
        let action = upload_action_as(&channel, &globex, &script, &[]).await;
        let response = execute_as(&channel, &globex, action).await.unwrap();
        assert_ne!(
            worker(&response),
            "acme-own",
            "globex's action reached acme's executor"
        );
    }
    // globex has no executor of its own: refused at once, and told
    // nothing about acme's.
    let action = upload_action_as(&channel, &globex, "true", &self_hosted).await;
    let status = execute_as(&channel, &globex, action).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("use-self-hosted-executors"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("acme"), "{}", status.message());
    drop(executor);
}

/// `kiln serve` on 0.0.0.0 in a network namespace of its own (only its
/// loopback, which the test never leaves), with `extra` flags.
fn serve_in_netns(data_dir: &Path, extra: &str) -> Process {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let script = format!(
        "ip link set lo up && exec {kiln} serve --listen 0.0.0.0:0 --monitoring-listen \
         127.0.0.1:0 --storage-backend memory --embedded-executor false --data-dir {} {extra}",
        data_dir.display()
    );
    let mut command = Command::new("unshare");
    command.args(["--net", "sh", "-c", &script]);
    Process::spawn_command(command)
}

#[test]
fn a_network_address_needs_keys_or_an_explicit_allow_unauthenticated() {
    if !common::root_available("a network namespace for a 0.0.0.0 listener") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");

    // No key, no flag: refused before anything is bound.
    let mut refused = serve_in_netns(&data_dir, "");
    refused.wait_for_log("refusing to serve 0.0.0.0:0 without authentication");
    let status = refused.child.wait().unwrap();
    assert!(!status.success());

    // Allowed: served, with a warning at start-up and in /healthz.
    let mut open = serve_in_netns(&data_dir, "--allow-unauthenticated");
    open.wait_for_log("without authentication (--allow-unauthenticated)");
    let monitoring = open.stdout_line_with("listening http://127.0.0.1:");
    let port = common::parse_monitoring_line(&monitoring);
    let pid = open.child.id().to_string();
    let health = Command::new("nsenter")
        .args(["--target", &pid, "--net", "busybox", "wget", "-qO-"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&health.stdout);
    assert!(
        text.starts_with("ok\n")
            && text.contains("warning: serving 0.0.0.0:0 without authentication"),
        "{text}{}",
        String::from_utf8_lossy(&health.stderr)
    );
    drop(open);

    // With a key it starts, and warns no more.
    create_key(&data_dir, "acme", "cache-read");
    let mut keyed = serve_in_netns(&data_dir, "");
    keyed.stdout_line_with("listening grpc://");
    let lines = keyed.log_until_all(&["kiln serving"]);
    assert!(
        !lines.iter().any(|l| l.contains("without authentication")),
        "{lines:#?}"
    );
}
