use super::*;

fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse_action(pairs: &[(&str, &str)]) -> Result<Platform, PlatformError> {
    let action = props(pairs);
    Platform::parse(&PropertySources {
        action: &action,
        ..Default::default()
    })
}

#[test]
fn defaults_follow_the_contract() {
    let platform = parse_action(&[]).unwrap();
    assert_eq!(platform.pool, None);
    assert_eq!(platform.os_family, OsFamily::Linux);
    assert_eq!(platform.arch, Arch::Amd64);
    assert_eq!(platform.isolation, None);
    assert_eq!(platform.docker_network, None);
    assert!(!platform.recycle_runner);
}

#[test]
fn every_known_key_parses_into_its_typed_value() {
    let platform = parse_action(&[
        ("Pool", "gpu"),
        ("OSFamily", "Linux"),
        ("Arch", "aarch64"),
        ("use-self-hosted-executors", "FALSE"),
        ("workload-isolation-type", "docker"),
        ("recycle-runner", "true"),
        ("nonroot-workspace", "true"),
        ("runner-recycling-key", "mysql@v1.2.3"),
        ("EstimatedCPU", "4000m"),
        ("EstimatedMemory", "4.5GB"),
        ("EstimatedFreeDiskBytes", "10GiB"),
        ("default-timeout", "1h30m"),
        ("termination-grace-period", "500ms"),
        ("persistentWorkerKey", ""),
        ("persistentWorkerProtocol", ""),
        ("container-image", "docker://127.0.0.1:5000/team/tools:v1"),
        ("container-registry-username", "ci"),
        ("container-registry-password", "hunter2"),
        ("dockerUser", "1000:1000"),
        ("dockerInit", "true"),
        ("dockerRunAsRoot", "false"),
        ("dockerNetwork", "off"),
        ("init-dockerd", "false"),
        ("enable-dockerd-tcp", "False"),
        ("ISA", "avx2"),
    ])
    .unwrap();
    assert_eq!(platform.pool.as_deref(), Some("gpu"));
    assert_eq!(platform.arch, Arch::Arm64);
    assert_eq!(platform.isolation, Some(IsolationType::Docker));
    assert!(platform.recycle_runner && platform.nonroot_workspace);
    assert_eq!(platform.resources.cpu_millis, Some(4000));
    assert_eq!(platform.resources.memory_bytes, Some(4_500_000_000));
    assert_eq!(platform.resources.free_disk_bytes, Some(10 << 30));
    assert_eq!(platform.default_timeout, Some(Duration::from_secs(5400)));
    assert_eq!(
        platform.termination_grace_period,
        Some(Duration::from_millis(500))
    );
    let image = platform.container_image.as_ref().unwrap();
    assert_eq!(image.registry, "127.0.0.1:5000");
    assert_eq!(image.repository, "team/tools");
    assert_eq!(image.reference, ImageReference::Tag("v1".into()));
    let credentials = platform.registry_credentials.as_ref().unwrap();
    assert_eq!(
        (credentials.username.as_str(), credentials.password.expose()),
        ("ci", "hunter2")
    );
    assert_eq!(platform.docker_user, Some(DockerUser::UidGid(1000, 1000)));
    assert!(platform.docker_init && !platform.docker_run_as_root);
    assert_eq!(platform.docker_network, Some(DockerNetwork::Off));
    assert_eq!(platform.other.get("ISA").map(String::as_str), Some("avx2"));

    // A preserved workspace needs a type that keeps runners.
    let platform = parse_action(&[
        ("workload-isolation-type", "sandbox"),
        ("recycle-runner", "true"),
        ("preserve-workspace", "True"),
        ("clean-workspace-inputs", "**/*.o, out/{a,b}/?.txt"),
    ])
    .unwrap();
    assert!(platform.preserve_workspace);
    assert_eq!(
        platform.clean_workspace_inputs,
        vec!["**/*.o", "out/{a,b}/?.txt"]
    );
}

#[test]
fn malformed_values_name_key_value_and_what_is_accepted() {
    for (key, value, accepted) in [
        ("EstimatedMemory", "lots", "size"),
        ("EstimatedCPU", "many", "CPU"),
        ("EstimatedComputeUnits", "-1", "compute units"),
        ("OSFamily", "plan9", "linux, darwin or windows"),
        ("Arch", "riscv", "amd64 or arm64"),
        ("workload-isolation-type", "chroot", "sandbox"),
        ("recycle-runner", "yes", "true or false"),
        ("default-timeout", "soon", "duration"),
        ("dockerNetwork", "host", "off or bridge"),
        ("container-image", "docker://Bad Image", "docker://"),
        ("container-image", "docker://alpine@sha256:abc", "sha256"),
        ("persistentWorkerProtocol", "xml", "proto or json"),
        ("Pool", " ", "non-empty"),
    ] {
        let error = parse_action(&[(key, value)]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(key), "{message}");
        assert!(message.contains(value), "{message}");
        assert!(message.contains(accepted), "{key}: {message}");
    }
    let error = parse_action(&[
        ("recycle-runner", "true"),
        ("preserve-workspace", "true"),
        ("clean-workspace-inputs", "a/["),
    ])
    .unwrap_err();
    {
        let (key, value, accepted) = ("clean-workspace-inputs", "a/[", "globs");
        let message = error.to_string();
        assert!(message.contains(key), "{message}");
        assert!(message.contains(value), "{message}");
        assert!(message.contains(accepted), "{key}: {message}");
    }
}

#[test]
fn warm_runner_options_without_a_warm_runner_are_refused_not_ignored() {
    let error = parse_action(&[("preserve-workspace", "true")]).unwrap_err();
    assert!(error.to_string().contains("recycle-runner=true"), "{error}");
    let error = parse_action(&[
        ("recycle-runner", "true"),
        ("clean-workspace-inputs", "*.o"),
    ])
    .unwrap_err();
    assert!(
        error.to_string().contains("clean-workspace-inputs"),
        "{error}"
    );
    assert!(
        error.to_string().contains("preserve-workspace=true"),
        "{error}"
    );
    parse_action(&[
        ("recycle-runner", "true"),
        ("preserve-workspace", "true"),
        ("clean-workspace-inputs", "*.o"),
    ])
    .unwrap();
}

#[test]
fn the_action_wins_over_the_command_and_headers_win_over_both() {
    let command = props(&[
        ("Pool", "from-command"),
        ("OSFamily", "linux"),
        ("ISA", "x"),
    ]);
    let action = props(&[("Pool", "from-action")]);
    let headers = header_properties([
        ("x-buildbuddy-platform.pool", "from-header"),
        ("x-kiln-platform.estimatedmemory", "2GB"),
        ("content-type", "application/grpc"),
    ]);
    let platform = Platform::parse(&PropertySources {
        command: &command,
        action: &action,
        headers: &[],
    })
    .unwrap();
    assert_eq!(platform.pool.as_deref(), Some("from-action"));
    assert_eq!(platform.other.get("ISA").map(String::as_str), Some("x"));
    let platform = Platform::parse(&PropertySources {
        command: &command,
        action: &action,
        headers: &headers,
    })
    .unwrap();
    // Header names arrive lower-cased; known keys regain their spelling.
    assert_eq!(platform.pool.as_deref(), Some("from-header"));
    assert_eq!(platform.resources.memory_bytes, Some(2_000_000_000));
}

#[test]
fn compute_units_are_a_shorthand_that_explicit_estimates_override() {
    let platform = parse_action(&[("EstimatedComputeUnits", "2")]).unwrap();
    assert_eq!(platform.resources.cpu_millis, Some(2000));
    assert_eq!(platform.resources.memory_bytes, Some(5_000_000_000));
    let platform =
        parse_action(&[("EstimatedComputeUnits", "2"), ("EstimatedCPU", "0.5")]).unwrap();
    assert_eq!(platform.resources.cpu_millis, Some(500));
    assert_eq!(platform.resources.memory_bytes, Some(5_000_000_000));
}

#[test]
fn images_parse_registries_tags_and_digests() {
    let image = |v: &str| {
        parse_action(&[("container-image", v)])
            .unwrap()
            .container_image
            .unwrap()
    };
    let alpine = image("alpine");
    assert_eq!(
        (alpine.registry.as_str(), alpine.repository.as_str()),
        ("docker.io", "alpine")
    );
    assert_eq!(alpine.reference, ImageReference::Tag("latest".into()));
    let digest = format!("sha256:{}", "a".repeat(64));
    let pinned = image(&format!("docker://gcr.io/p/img@{digest}"));
    assert_eq!(pinned.registry, "gcr.io");
    assert_eq!(pinned.reference, ImageReference::Digest(digest));
    let local = image("localhost/busybox:1.36");
    assert_eq!(local.registry, "localhost");
    assert_eq!(local.to_string(), "localhost/busybox:1.36");
}

#[test]
fn secrets_never_print_and_only_their_hash_reaches_the_runner_key() {
    let platform = parse_action(&[
        ("container-registry-username", "ci"),
        ("container-registry-password", "hunter2"),
    ])
    .unwrap();
    assert!(!format!("{platform:?}").contains("hunter2"));
    assert!(!format!("{:?}", platform.redacted_properties()).contains("hunter2"));
    let error = parse_action(&[("container-registry-password", "hunter2")]).unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");

    let other = parse_action(&[
        ("container-registry-username", "ci"),
        ("container-registry-password", "other"),
    ])
    .unwrap();
    assert_ne!(platform.runner_key("org", ""), other.runner_key("org", ""));
}

#[test]
fn runner_keys_separate_what_must_not_share_a_runner() {
    let key = |pairs: &[(&str, &str)], org: &str| parse_action(pairs).unwrap().runner_key(org, "");
    let base = [
        ("workload-isolation-type", "docker"),
        ("container-image", "alpine:3"),
    ];
    assert_eq!(key(&base, "a"), key(&base, "a"));
    assert_ne!(
        key(&base, "a"),
        key(&base, "b"),
        "organisations never share"
    );
    let platform = parse_action(&base).unwrap();
    assert_ne!(
        platform.runner_key("a", "main"),
        platform.runner_key("a", "other"),
        "instances never share"
    );
    assert_ne!(
        platform.runner_key("ab", ""),
        platform.runner_key("a", "b"),
        "the fields cannot run into each other"
    );
    assert_ne!(
        key(&base, "a"),
        key(
            &[base[0], base[1], ("runner-recycling-key", "mysql@1")],
            "a"
        )
    );
    assert_ne!(
        key(&base, "a"),
        key(&[base[0], ("container-image", "alpine:4")], "a")
    );
    // Order of properties does not matter.
    assert_eq!(key(&[base[1], base[0]], "a"), key(&base, "a"));
    // A header override counts like any property.
    let action = props(&base);
    let headers = header_properties([("x-buildbuddy-platform.recycle-runner", "true")]);
    let with_header = Platform::parse(&PropertySources {
        action: &action,
        headers: &headers,
        ..Default::default()
    })
    .unwrap();
    assert_ne!(with_header.runner_key("a", ""), key(&base, "a"));
}

fn refusal(pairs: &[(&str, &str)]) -> PlatformError {
    parse_action(pairs).expect_err(&format!("{pairs:?} is refused"))
}

#[test]
fn dockerd_is_accepted_in_a_microvm_and_refused_elsewhere() {
    let platform = parse_action(&[
        ("workload-isolation-type", "firecracker"),
        ("init-dockerd", "true"),
        ("enable-dockerd-tcp", "TRUE"),
    ])
    .unwrap();
    assert!(platform.init_dockerd && platform.enable_dockerd_tcp);
    // Without a type the executor's default decides, where it runs.
    assert!(
        parse_action(&[("init-dockerd", "true")])
            .unwrap()
            .init_dockerd
    );
    for isolation in ["none", "sandbox", "podman", "docker"] {
        for (key, value) in [("init-dockerd", "true"), ("enable-dockerd-tcp", "True")] {
            let error = refusal(&[("workload-isolation-type", isolation), (key, value)]);
            assert_eq!(error.kind, PlatformErrorKind::Invalid, "{error}");
            let message = error.to_string();
            assert!(
                message.contains(&format!("{key}={value:?} is invalid")),
                "{message}"
            );
            assert!(
                message.contains(&format!("workload-isolation-type={isolation}")),
                "{message}"
            );
        }
    }
    // The TCP port is the daemon's: alone it means nothing.
    let error = refusal(&[
        ("workload-isolation-type", "firecracker"),
        ("enable-dockerd-tcp", "true"),
    ]);
    assert_eq!(error.kind, PlatformErrorKind::Invalid, "{error}");
    assert!(error.to_string().contains("init-dockerd=true"), "{error}");
    // What asks for nothing is accepted anywhere.
    let platform = parse_action(&[
        ("workload-isolation-type", "sandbox"),
        ("use-self-hosted-executors", "false"),
        ("persistentWorkerKey", ""),
        ("persistentWorkerProtocol", ""),
        ("init-dockerd", "false"),
        ("enable-dockerd-tcp", "false"),
    ])
    .unwrap();
    assert!(!platform.init_dockerd && !platform.enable_dockerd_tcp);
    assert!(refusal(&[("init-dockerd", "yes")])
        .to_string()
        .contains("expected true or false"));
}

#[test]
fn use_self_hosted_executors_is_read() {
    assert!(
        parse_action(&[("use-self-hosted-executors", "true")])
            .unwrap()
            .self_hosted
    );
    assert!(
        !parse_action(&[("use-self-hosted-executors", "False")])
            .unwrap()
            .self_hosted
    );
    assert!(!parse_action(&[]).unwrap().self_hosted);
    let error = refusal(&[("use-self-hosted-executors", "sometimes")]);
    assert_eq!(error.kind, PlatformErrorKind::Invalid, "{error}");
}

#[test]
fn an_image_is_refused_where_the_action_would_run_on_the_host() {
    for isolation in ["none", "sandbox"] {
        let error = refusal(&[
            ("workload-isolation-type", isolation),
            ("container-image", "docker://127.0.0.1:5000/team/tools:v1"),
        ]);
        assert_eq!(error.kind, PlatformErrorKind::Invalid, "{error}");
        let message = error.to_string();
        assert!(
            message.contains("container-image=\"docker://127.0.0.1:5000/team/tools:v1\""),
            "{message}"
        );
        assert!(
            message.contains(&format!("workload-isolation-type={isolation} runs")),
            "{message}"
        );
    }
    for isolation in ["docker", "podman"] {
        parse_action(&[
            ("workload-isolation-type", isolation),
            ("container-image", "alpine:3"),
        ])
        .unwrap();
    }
    // No image: nothing to refuse, credentials or not (they are often
    // sent as headers for a whole build and have nothing to pull here).
    for image in ["none", ""] {
        parse_action(&[
            ("workload-isolation-type", "sandbox"),
            ("container-image", image),
            ("container-registry-username", "ci"),
            ("container-registry-password", "hunter2"),
        ])
        .unwrap();
    }
}

#[test]
fn a_preserved_workspace_is_refused_where_no_runner_is_kept() {
    let error = refusal(&[
        ("workload-isolation-type", "firecracker"),
        ("recycle-runner", "true"),
        ("preserve-workspace", "true"),
    ]);
    assert_eq!(error.kind, PlatformErrorKind::Unsupported, "{error}");
    let message = error.to_string();
    assert!(message.contains("preserve-workspace=\"true\""), "{message}");
    assert!(
        message.contains("workload-isolation-type=firecracker"),
        "{message}"
    );
    // recycle-runner alone is a hint: a cold runner is still correct.
    parse_action(&[
        ("workload-isolation-type", "firecracker"),
        ("recycle-runner", "true"),
    ])
    .unwrap();
    for isolation in ["none", "sandbox", "docker", "podman"] {
        parse_action(&[
            ("workload-isolation-type", isolation),
            ("recycle-runner", "true"),
            ("preserve-workspace", "true"),
        ])
        .unwrap();
    }
}

#[test]
fn a_header_overrides_an_unknown_key_whatever_its_case() {
    let action = props(&[("ISA", "avx2"), ("Pool", "gpu"), ("POOL", "odd")]);
    let parse = |headers: &[(&'static str, &'static str)]| {
        let headers = header_properties(headers.iter().copied());
        Platform::parse(&PropertySources {
            action: &action,
            headers: &headers,
            ..Default::default()
        })
        .unwrap()
    };
    // HTTP/2 delivers `x-buildbuddy-platform.isa`: it replaces `ISA`,
    // which keeps the Action's spelling.
    let platform = parse(&[("x-buildbuddy-platform.ISA", "sse")]);
    assert_eq!(platform.other.get("ISA").map(String::as_str), Some("sse"));
    assert!(!platform.other.contains_key("isa"));
    assert!(!platform.spelled_by_header("ISA"));
    // As if the Action had said it.
    let said = parse_action(&[("ISA", "sse"), ("Pool", "gpu"), ("POOL", "odd")]).unwrap();
    assert_eq!(platform.runner_key("o", ""), said.runner_key("o", ""));
    assert_eq!(platform.other, said.other);

    // A known key keeps to its own spelling: `POOL` is another key.
    let platform = parse(&[("x-kiln-platform.pool", "cpu")]);
    assert_eq!(platform.pool.as_deref(), Some("cpu"));
    assert_eq!(platform.other.get("POOL").map(String::as_str), Some("odd"));

    // A key only a header names stays lower-case, marked as such.
    let platform = parse(&[("x-buildbuddy-platform.Cache-Silo-Key", "a")]);
    assert_eq!(
        platform.other.get("cache-silo-key").map(String::as_str),
        Some("a")
    );
    assert!(platform.spelled_by_header("cache-silo-key"));

    // Two Action keys that differ only in case both take the header's value.
    let action = props(&[("Isa", "a"), ("ISA", "b")]);
    let headers = header_properties([("x-buildbuddy-platform.isa", "c")]);
    let platform = Platform::parse(&PropertySources {
        action: &action,
        headers: &headers,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(platform.other.get("Isa").map(String::as_str), Some("c"));
    assert_eq!(platform.other.get("ISA").map(String::as_str), Some("c"));
    assert_eq!(platform.other.len(), 2);
}

#[test]
fn docker_network_distinguishes_unset_from_bridge() {
    let network = |value: &str| {
        parse_action(&[("dockerNetwork", value)])
            .unwrap()
            .docker_network
    };
    assert_eq!(network(""), None);
    assert_eq!(network("Bridge"), Some(DockerNetwork::Bridge));
    assert_eq!(network("off"), Some(DockerNetwork::Off));
}

#[test]
fn a_grace_period_above_the_limit_is_refused_naming_it() {
    let platform = parse_action(&[("termination-grace-period", "10m")]).unwrap();
    let error = platform
        .check_termination_grace_period(Duration::from_secs(300), "max_termination_grace_s")
        .unwrap_err();
    assert_eq!(error.kind, PlatformErrorKind::Invalid);
    let message = error.to_string();
    assert!(
        message.contains("termination-grace-period=\"10m\""),
        "{message}"
    );
    assert!(message.contains("300s"), "{message}");
    assert!(message.contains("max_termination_grace_s"), "{message}");
    platform
        .check_termination_grace_period(Duration::from_secs(600), "max")
        .unwrap();
    parse_action(&[])
        .unwrap()
        .check_termination_grace_period(Duration::ZERO, "max")
        .unwrap();
}

#[test]
fn header_overrides_have_an_identity_that_leaves_out_credentials() {
    let of = |pairs: &[(&str, &str)]| {
        overrides_digest(&header_properties(
            pairs.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
        ))
    };
    assert_eq!(of(&[]), None);
    let debian = of(&[(
        "x-buildbuddy-platform.container-image",
        "docker://debian:12",
    )]);
    let alpine = of(&[("x-buildbuddy-platform.container-image", "docker://alpine:3")]);
    assert!(debian.is_some());
    assert_ne!(debian, alpine);
    // Credentials alone are no override; beside one they change nothing.
    assert_eq!(
        of(&[
            ("x-buildbuddy-platform.container-registry-username", "me"),
            (
                "x-buildbuddy-platform.container-registry-password",
                "hunter2"
            ),
        ]),
        None
    );
    assert_eq!(
        of(&[
            (
                "x-buildbuddy-platform.container-registry-password",
                "hunter2"
            ),
            (
                "x-buildbuddy-platform.container-image",
                "docker://debian:12"
            ),
        ]),
        debian
    );
    // Order and header case do not matter; which prefix was used does not either.
    assert_eq!(
        of(&[
            ("x-buildbuddy-platform.dockerNetwork", "off"),
            ("X-Kiln-Platform.container-image", "docker://debian:12"),
        ]),
        of(&[
            (
                "x-buildbuddy-platform.container-image",
                "docker://debian:12"
            ),
            ("x-buildbuddy-platform.dockernetwork", "off"),
        ])
    );
}

#[test]
fn a_persistent_worker_key_is_parsed_with_its_protocol() {
    let platform = parse_action(&[("persistentWorkerKey", "javac-1")]).unwrap();
    assert_eq!(
        platform.persistent_worker,
        Some(PersistentWorker {
            key: "javac-1".into(),
            protocol: WorkerProtocol::Proto
        })
    );
    let platform = parse_action(&[
        ("persistentWorkerKey", "k"),
        ("persistentWorkerProtocol", "JSON"),
        ("recycle-runner", "true"),
        ("workload-isolation-type", "none"),
    ])
    .unwrap();
    assert_eq!(
        platform.persistent_worker.map(|w| w.protocol),
        Some(WorkerProtocol::Json)
    );
    // Different keys never share a runner.
    let a = parse_action(&[("persistentWorkerKey", "a"), ("recycle-runner", "true")]).unwrap();
    let b = parse_action(&[("persistentWorkerKey", "b"), ("recycle-runner", "true")]).unwrap();
    assert_ne!(a.runner_key("o", ""), b.runner_key("o", ""));
    // An empty key is no key.
    let none = parse_action(&[("persistentWorkerKey", "")]).unwrap();
    assert_eq!(none.persistent_worker, None);
}

#[test]
fn persistent_worker_properties_that_cannot_work_are_refused() {
    let error = refusal(&[("persistentWorkerProtocol", "json")]);
    assert_eq!(error.kind, PlatformErrorKind::Invalid, "{error}");
    assert!(
        error.to_string().contains("set persistentWorkerKey too"),
        "{error}"
    );
    let error = refusal(&[
        ("persistentWorkerKey", "k"),
        ("recycle-runner", "true"),
        ("workload-isolation-type", "firecracker"),
    ]);
    assert_eq!(error.kind, PlatformErrorKind::Unsupported, "{error}");
    let message = error.to_string();
    assert!(message.contains("persistentWorkerKey"), "{message}");
    assert!(
        message.contains("workload-isolation-type=firecracker"),
        "{message}"
    );
    for isolation in ["none", "sandbox", "docker", "podman"] {
        parse_action(&[
            ("persistentWorkerKey", "k"),
            ("recycle-runner", "true"),
            ("workload-isolation-type", isolation),
        ])
        .unwrap();
    }
    // Without recycle-runner the key asks for nothing a one-shot action
    // cannot give.
    parse_action(&[
        ("persistentWorkerKey", "k"),
        ("workload-isolation-type", "sandbox"),
    ])
    .unwrap();
}
