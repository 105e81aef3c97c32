//! A persistent worker for Kiln's tests, speaking Bazel's worker protocol.
//!
//! Started with `--persistent_worker` last, it answers WorkRequests on
//! stdin (length-delimited protobuf, or one JSON object per line with
//! `--json`) until stdin closes. Without it, it runs once: `@file`
//! arguments are read as flag files, and the answer goes to stderr and the
//! exit code. Each request's arguments:
//! - `--out=PATH`: writes `pid=P request=N inputs=K` to PATH;
//! - `--exit=N`: answers with exit code N;
//! - `--crash`: writes a line to stderr and exits without answering;
//! - `--hang`: never answers;
//! - `--garbage`: answers with bytes that are no response.
//!
//! The answer's output is `test worker pid=P request=N` (N counts from 1
//! in each process). Its messages are declared here, from Bazel's
//! `worker_protocol.proto`, independently of Kiln's own.

use std::io::{BufRead, Write};

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct Input {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(bytes = "vec", tag = "2")]
    digest: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkRequest {
    #[prost(string, repeated, tag = "1")]
    arguments: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    inputs: Vec<Input>,
    #[prost(int32, tag = "3")]
    request_id: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkResponse {
    #[prost(int32, tag = "1")]
    exit_code: i32,
    #[prost(string, tag = "2")]
    output: String,
    #[prost(int32, tag = "3")]
    request_id: i32,
}

/// What one request asks for.
enum Answer {
    Respond(i32, String),
    Crash,
    Hang,
    Garbage,
}

fn handle(arguments: &[String], inputs: usize, request: u64) -> Answer {
    let pid = std::process::id();
    let mut exit_code = 0;
    for argument in arguments {
        if let Some(path) = argument.strip_prefix("--out=") {
            let text = format!("pid={pid} request={request} inputs={inputs}\n");
            if let Err(e) = std::fs::write(path, text) {
                return Answer::Respond(1, format!("cannot write {path}: {e}"));
            }
        } else if let Some(code) = argument.strip_prefix("--exit=") {
            exit_code = code.parse().unwrap_or(1);
        } else if argument == "--crash" {
            return Answer::Crash;
        } else if argument == "--hang" {
            return Answer::Hang;
        } else if argument == "--garbage" {
            return Answer::Garbage;
        }
    }
    Answer::Respond(
        exit_code,
        format!("test worker pid={pid} request={request}"),
    )
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.last().map(String::as_str) != Some("--persistent_worker") {
        return one_shot(&arguments);
    }
    if arguments.iter().any(|a| a.starts_with('@')) {
        eprintln!("test worker: a flag file reached the startup arguments: {arguments:?}");
        std::process::exit(2);
    }
    let json = arguments.iter().any(|a| a == "--json");
    eprintln!("test worker {} started", std::process::id());
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let mut stdout = std::io::stdout().lock();
    for request in 1.. {
        let parsed = if json {
            read_json(&mut stdin)
        } else {
            read_proto(&mut stdin)
        };
        let Some((arguments, inputs)) = parsed else {
            return;
        };
        let (exit_code, output) = match handle(&arguments, inputs, request) {
            Answer::Respond(code, output) => (code, output),
            Answer::Crash => {
                eprintln!("test worker: crashing on request {request} as asked");
                std::process::exit(3);
            }
            Answer::Hang => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            Answer::Garbage => {
                stdout
                    .write_all(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\n")
                    .unwrap();
                stdout.flush().unwrap();
                continue;
            }
        };
        if json {
            let line = serde_json::json!({"exitCode": exit_code, "output": output});
            writeln!(stdout, "{line}").unwrap();
        } else {
            let response = WorkResponse {
                exit_code,
                output,
                request_id: 0,
            };
            stdout
                .write_all(&response.encode_length_delimited_to_vec())
                .unwrap();
        }
        stdout.flush().unwrap();
    }
}

fn read_proto(stdin: &mut impl BufRead) -> Option<(Vec<String>, usize)> {
    let mut length = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8];
        stdin.read_exact(&mut byte).ok()?;
        length |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length as usize];
    stdin.read_exact(&mut body).ok()?;
    let request = WorkRequest::decode(body.as_slice()).expect("a WorkRequest");
    Some((request.arguments, request.inputs.len()))
}

fn read_json(stdin: &mut impl BufRead) -> Option<(Vec<String>, usize)> {
    let mut line = String::new();
    if stdin.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON WorkRequest");
    let arguments = value["arguments"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let inputs = value["inputs"].as_array().map_or(0, Vec::len);
    Some((arguments, inputs))
}

fn one_shot(arguments: &[String]) {
    let mut expanded = Vec::new();
    for argument in arguments {
        match argument.strip_prefix('@') {
            Some(path) => {
                let text = std::fs::read_to_string(path).expect("a readable flag file");
                expanded.extend(text.lines().map(String::from));
            }
            None => expanded.push(argument.clone()),
        }
    }
    match handle(&expanded, 0, 1) {
        Answer::Respond(code, output) => {
            eprintln!("one-shot {output}");
            std::process::exit(code);
        }
        _ => std::process::exit(4),
    }
}
