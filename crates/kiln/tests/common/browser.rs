//! A headless Chromium driven over its DevTools protocol: load a page,
//! let its scripts run, read the DOM, and collect everything it logged
//! to the console (messages, uncaught exceptions, failed loads, CSP
//! violations). Chromium's command line cannot report console messages,
//! so the tests speak the protocol: JSON messages over one WebSocket.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// One Chromium process, killed when dropped.
pub struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

/// A page as the browser saw it.
pub struct Visit {
    pub dom: String,
    /// Console messages, exceptions and log entries, one line each.
    pub console: Vec<String>,
}

impl Browser {
    /// Starts Chromium headless, as this machine runs it: no sandbox as
    /// root, and no background traffic to Google (the network is closed).
    pub fn start(profile: &Path) -> Browser {
        let mut child = Command::new("/usr/bin/chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = sender.send(url.trim().to_string());
                }
            }
        });
        let url = receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium did not print its DevTools address");
        let (socket, _) = tungstenite::connect(url.as_str()).expect("connect to DevTools");
        Browser {
            child,
            socket,
            next_id: 0,
        }
    }

    /// Sends `method` (to `session`, if any); returns its result, keeping
    /// the events that arrive meanwhile in `events`.
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
        events: &mut Vec<Value>,
    ) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .expect("send to DevTools");
        loop {
            let reply = self
                .receive(Duration::from_secs(60))
                .expect("DevTools reply");
            if reply["id"] == json!(id) {
                if let Some(error) = reply.get("error") {
                    panic!("DevTools {method} failed: {error}");
                }
                return reply["result"].clone();
            }
            events.push(reply);
        }
    }

    fn receive(&mut self, within: Duration) -> Option<Value> {
        if let MaybeTlsStream::Plain(stream) = self.socket.get_ref() {
            stream.set_read_timeout(Some(within)).unwrap();
        }
        match self.socket.read() {
            Ok(Message::Text(text)) => serde_json::from_str(&text).ok(),
            Ok(_) => Some(Value::Null),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("DevTools connection: {e}"),
        }
    }

    /// Loads `url` in a new tab of `width`×`height`, lets it run for
    /// `settle` after its load event (long enough for a live update), and
    /// returns its DOM and console. With `screenshot`, saves a PNG there.
    pub fn visit(
        &mut self,
        url: &str,
        width: u32,
        height: u32,
        settle: Duration,
        screenshot: Option<&Path>,
    ) -> Visit {
        let mut events = Vec::new();
        let target = self.call(
            None,
            "Target.createTarget",
            json!({ "url": "about:blank" }),
            &mut events,
        );
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            &mut events,
        );
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let s = Some(session.as_str());
        for method in ["Runtime.enable", "Log.enable", "Page.enable"] {
            self.call(s, method, json!({}), &mut events);
        }
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600 }),
            &mut events,
        );
        self.call(s, "Page.navigate", json!({ "url": url }), &mut events);
        let started = Instant::now();
        let mut loaded = None;
        while started.elapsed() < Duration::from_secs(60) {
            if loaded.is_some_and(|at: Instant| at.elapsed() >= settle) {
                break;
            }
            if let Some(event) = self.receive(Duration::from_millis(100)) {
                if event["method"] == "Page.loadEventFired" && loaded.is_none() {
                    loaded = Some(Instant::now());
                }
                events.push(event);
            }
        }
        assert!(loaded.is_some(), "{url} never finished loading");
        let dom = self.call(
            s,
            "Runtime.evaluate",
            json!({ "expression": "document.documentElement.outerHTML", "returnByValue": true }),
            &mut events,
        )["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(path) = screenshot {
            let shot = self.call(
                s,
                "Page.captureScreenshot",
                json!({ "format": "png" }),
                &mut events,
            );
            let png = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                shot["data"].as_str().unwrap(),
            )
            .expect("a base64 screenshot");
            std::fs::write(path, png).unwrap();
        }
        self.call(
            None,
            "Target.closeTarget",
            json!({ "targetId": target_id }),
            &mut events,
        );
        let console = events
            .iter()
            .filter(|e| e["sessionId"] == json!(session))
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.consoleAPICalled" => Some(format!(
                    "console.{}: {}",
                    e["params"]["type"], e["params"]["args"]
                )),
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", e["params"]["exceptionDetails"]))
                }
                "Log.entryAdded" => Some(format!(
                    "log {}: {}",
                    e["params"]["entry"]["level"], e["params"]["entry"]["text"]
                )),
                _ => None,
            })
            .collect();
        Visit { dom, console }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
