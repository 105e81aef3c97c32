//! The web UI: server-rendered pages over the scheduler's snapshots and
//! the CAS. Every value that came from a client (command lines, paths,
//! build ids, messages) is escaped by `maud`; platform values that are
//! secrets and every header override are shown as `<redacted>`.
//!
//! Pages: the overview (executors, queues, rates), the operations list
//! (filters by state, pool, outcome and build), a build's page, an
//! action's page (command, platform, executor, timeline, status, logs,
//! outputs) and a paged view of stdout/stderr.

mod format;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use kiln_cas::wire::parse_digest;
use kiln_cas::{CasCounters, Storage};
use kiln_proto::reapi;
use kiln_scheduler::report::{ExecutorSnapshot, OperationDetail, QueueSnapshot};
use kiln_scheduler::{OperationSummary, OutcomeClass, Scheduler, Stage};
use kiln_store::{Digest, DigestFunction};
use maud::{html, Markup, DOCTYPE};
use prost::Message;

pub use format::{bytes, duration, query_escape, since};

/// How much of stdout/stderr one page shows.
pub const LOG_PAGE_BYTES: u64 = 64 * 1024;
/// Operations listed per page.
const PAGE_ROWS: usize = 100;

/// A rendered page: its `<main>` content, its title, and whether it
/// changes (and so refreshes itself).
pub struct Page {
    pub title: String,
    pub main: Markup,
    pub live: bool,
}

/// The whole document around `page`.
pub fn document(page: &Page) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (page.title) " · Kiln" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/static/style.css";
                script src="/static/live.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "KILN" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/operations" { "Operations" }
                        a href="/metrics" { "Metrics" }
                    }
                    span.live #live-status { @if page.live { "live" } @else { "" } }
                }
                main data-live=[page.live.then_some("1")] { (page.main) }
            }
        }
    }
}

fn outcome_badge(summary: &OperationSummary) -> Markup {
    match &summary.outcome {
        Some(outcome) => {
            html! { span class={"badge " (outcome.class.name())} { (outcome.class.name()) } }
        }
        None => html! { span class={"badge " (summary.stage.name())} { (summary.stage.name()) } },
    }
}

fn operation_link(name: &str) -> String {
    format!("/operation/{}", name.trim_start_matches("operations/"))
}

fn build_link(id: &str) -> String {
    format!("/build?id={}", query_escape(id))
}

fn short_digest(digest: &reapi::Digest) -> String {
    format!(
        "{}…/{}",
        digest.hash.get(..12).unwrap_or(&digest.hash),
        digest.size_bytes
    )
}

/// How long an operation took (or has taken so far).
fn elapsed(summary: &OperationSummary) -> Duration {
    let end = summary
        .outcome
        .as_ref()
        .map_or_else(SystemTime::now, |o| o.finished_at);
    end.duration_since(summary.queued_at).unwrap_or_default()
}

/// The overview: executors, queues, execution rate and cache hits. Of
/// operations, only organisation `org`'s count and are listed.
pub fn overview(scheduler: Option<&Scheduler>, storage: &Storage, org: &str) -> Page {
    let counters = storage.counters();
    let hits = CasCounters::get(&counters.action_cache_hits);
    let misses = CasCounters::get(&counters.action_cache_misses);
    let (mut executors, queues, operations) = match scheduler {
        Some(s) => (s.executors(), s.queues(Some(org)), operations_of(s, org)),
        None => Default::default(),
    };
    // The shared fleet's, and the caller's organisation's own.
    executors.retain(|executor| executor.org.is_empty() || *executor.org == *org);
    let minute_ago = SystemTime::now() - Duration::from_secs(60);
    // Executions, not requests: one merged into another's execution ran
    // nothing of its own.
    let last_minute: Vec<&OperationSummary> = operations
        .iter()
        .filter(|o| o.merged_into.is_none())
        .filter(|o| {
            o.outcome
                .as_ref()
                .is_some_and(|o| o.finished_at >= minute_ago)
        })
        .collect();
    let ran_last_minute = last_minute
        .iter()
        .filter(|o| {
            o.outcome
                .as_ref()
                .is_some_and(|o| o.class != OutcomeClass::Cached)
        })
        .count();
    let cached_last_minute = last_minute.len() - ran_last_minute;
    let queued: usize = queues.iter().map(|q| q.queued).sum();
    let executing: usize = queues.iter().map(|q| q.executing).sum();
    let usage = storage.store().usage();
    let main = html! {
        h1 { "Overview" }
        div.cards {
            div.card { div.value { (ran_last_minute) } div.label { "executions in the last minute" } }
            div.card { div.value { (cached_last_minute) } div.label { "cache hits in the last minute" } }
            div.card {
                div.value { (ratio(hits, hits + misses)) }
                div.label { "Action Cache hit ratio since start (" (hits) " of " (hits + misses) ")" }
            }
            div.card { div.value { (queued) } div.label { "queued" } }
            div.card { div.value { (executing) } div.label { "executing" } }
            div.card {
                div.value { (bytes(usage.bytes)) }
                div.label { "stored, of " (bytes(usage.max_bytes)) }
            }
        }
        @if scheduler.is_none() {
            p.muted { "Remote execution is disabled on this server (execution.enabled = false)." }
        } @else {
            h2 { "Executors" }
            (executor_table(&executors))
            h2 { "Queues" }
            (queue_table(&queues))
            h2 { "Recent builds" }
            (build_table(&operations))
        }
    };
    Page {
        title: "Overview".into(),
        main,
        live: true,
    }
}

/// A table's place when it has no rows.
fn empty(message: &str) -> Markup {
    html! { div.scroll { p.empty { (message) } } }
}

fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

fn executor_table(executors: &[ExecutorSnapshot]) -> Markup {
    if executors.is_empty() {
        return empty("No executor is registered.");
    }
    let amount = |used: u64, total: u64, show: fn(u64) -> String| {
        if total == u64::MAX {
            format!("{} / unlimited", show(used))
        } else {
            format!("{} / {}", show(used), show(total))
        }
    };
    html! {
        div.scroll { table {
            thead { tr {
                th { "Executor" } th { "Pool" } th { "Platform" } th { "Isolation" }
                th { "Properties" } th { "Running" } th { "CPU in use" } th { "Memory in use" }
                th { "Warm runners" } th { "Last heartbeat" }
            } }
            tbody {
                @for e in executors {
                    tr {
                        td { (e.name) @if e.embedded { " " span.badge { "embedded" } } }
                        td { (e.pool) }
                        td { (e.os_family) "/" (e.arch) }
                        td { (e.isolation_types.join(", ")) }
                        td.mono {
                            @for (k, v) in &e.properties { (k) "=" (v) br; }
                        }
                        td.num {
                            (e.running) @if e.slots > 0 { " / " (e.slots) }
                        }
                        td.num { (amount(e.capacity.cpu_millis.saturating_sub(e.free.cpu_millis), e.capacity.cpu_millis, |m| format!("{:.1}", m as f64 / 1000.0))) }
                        td.num { (amount(e.capacity.memory_bytes.saturating_sub(e.free.memory_bytes), e.capacity.memory_bytes, bytes)) }
                        td.num { (e.warm_runners) }
                        td { (since(e.last_seen)) }
                    }
                }
            }
        } }
    }
}

fn queue_table(queues: &[QueueSnapshot]) -> Markup {
    if queues.is_empty() {
        return empty("No queue yet.");
    }
    html! {
        div.scroll { table {
            thead { tr {
                th { "Queue" } th { "Queued" } th { "Executing" } th { "Oldest wait" } th { "Executors" }
            } }
            tbody {
                @for q in queues {
                    tr {
                        td { a href={"/operations?pool=" (query_escape(&q.pool))} { (q.key) } }
                        td.num { (q.queued) }
                        td.num { (q.executing) }
                        td.num { (q.oldest_queued.map(duration).unwrap_or_else(|| "–".into())) }
                        td.num { (q.executors) }
                    }
                }
            }
        } }
    }
}

/// Builds (invocation ids) by their latest operation, newest first.
fn build_table(operations: &[OperationSummary]) -> Markup {
    #[derive(Default)]
    struct Build {
        latest: Option<SystemTime>,
        total: usize,
        failed: usize,
        cached: usize,
        running: usize,
    }
    let mut builds: HashMap<&str, Build> = HashMap::new();
    for op in operations.iter().filter(|o| !o.invocation_id.is_empty()) {
        let build = builds.entry(&op.invocation_id).or_default();
        build.latest = build.latest.max(Some(op.queued_at));
        build.total += 1;
        match op.outcome.as_ref().map(|o| o.class) {
            Some(OutcomeClass::Cached) => build.cached += 1,
            Some(OutcomeClass::Success) => {}
            Some(_) => build.failed += 1,
            None => build.running += 1,
        }
    }
    let mut builds: Vec<(&str, Build)> = builds.into_iter().collect();
    builds.sort_by_key(|(_, build)| std::cmp::Reverse(build.latest));
    builds.truncate(10);
    if builds.is_empty() {
        return empty("No build has sent an action yet.");
    }
    html! {
        div.scroll { table {
            thead { tr { th { "Build (tool_invocation_id)" } th { "Actions" } th { "Failed" } th { "Cached" } th { "In flight" } th { "Last action" } } }
            tbody {
                @for (id, b) in &builds {
                    tr {
                        td.mono { a href=(build_link(id)) { (id) } }
                        td.num { (b.total) }
                        td.num { @if b.failed > 0 { span.badge.bad { (b.failed) } } @else { "0" } }
                        td.num { (b.cached) }
                        td.num { (b.running) }
                        td { (b.latest.map(since).unwrap_or_default()) }
                    }
                }
            }
        } }
    }
}

/// The operations list's filters, as its query string gives them.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Filters {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub build: String,
    #[serde(default)]
    pub page: usize,
}

impl Filters {
    fn keeps(&self, op: &OperationSummary) -> bool {
        (self.state.is_empty() || op.stage.name() == self.state)
            && (self.pool.is_empty() || op.pool == self.pool)
            && (self.build.is_empty() || op.invocation_id == self.build)
            && (self.outcome.is_empty()
                || op.outcome.as_ref().map(|o| o.class.name()) == Some(self.outcome.as_str()))
    }

    fn query(&self, page: usize) -> String {
        let mut query = format!("page={page}");
        for (key, value) in [
            ("state", &self.state),
            ("pool", &self.pool),
            ("outcome", &self.outcome),
            ("build", &self.build),
        ] {
            if !value.is_empty() {
                query.push_str(&format!("&{key}={}", query_escape(value)));
            }
        }
        query
    }
}

/// The operations kept for organisation `org` (empty: open access), newest
/// first.
pub fn operations_of(scheduler: &Scheduler, org: &str) -> Vec<OperationSummary> {
    let mut all = scheduler.operations();
    all.retain(|operation| *operation.org == *org);
    all
}

/// Running, queued and recent finished operations of organisation `org`,
/// filtered.
pub fn operations(scheduler: &Scheduler, filters: &Filters, org: &str) -> Page {
    let all = operations_of(scheduler, org);
    let pools: BTreeSet<&str> = all
        .iter()
        .map(|o| o.pool.as_str())
        .filter(|p| !p.is_empty())
        .collect();
    let kept: Vec<&OperationSummary> = all.iter().filter(|o| filters.keeps(o)).collect();
    let first = filters.page * PAGE_ROWS;
    let shown = kept.iter().skip(first).take(PAGE_ROWS);
    let select = |name: &str, current: &str, options: &[&str]| {
        html! {
            select name=(name) {
                option value="" selected[current.is_empty()] { "any" }
                @for option in options {
                    option value=(option) selected[*option == current] { (option) }
                }
            }
        }
    };
    let states = [Stage::Queued, Stage::Executing, Stage::Completed].map(Stage::name);
    let outcomes = OutcomeClass::ALL.map(OutcomeClass::name);
    let pools: Vec<&str> = pools.into_iter().collect();
    let main = html! {
        h1 { "Operations" }
        form.filters method="get" action="/operations" {
            label { "State" (select("state", &filters.state, &states)) }
            label { "Pool" (select("pool", &filters.pool, &pools)) }
            label { "Outcome" (select("outcome", &filters.outcome, &outcomes)) }
            label { "Build" input type="text" name="build" value=(filters.build) placeholder="tool_invocation_id"; }
            button type="submit" { "Filter" }
        }
        p.muted { (kept.len()) " of " (all.len()) " operations kept by the server match." }
        (operation_table(shown, true))
        div.pager {
            @if filters.page > 0 { a href={"/operations?" (filters.query(filters.page - 1))} { "← newer" } }
            @if first + PAGE_ROWS < kept.len() { a href={"/operations?" (filters.query(filters.page + 1))} { "older →" } }
        }
    };
    Page {
        title: "Operations".into(),
        main,
        live: true,
    }
}

fn operation_table<'a>(
    operations: impl Iterator<Item = &'a &'a OperationSummary>,
    with_build: bool,
) -> Markup {
    let rows: Vec<&OperationSummary> = operations.copied().collect();
    if rows.is_empty() {
        return empty("No operation matches.");
    }
    html! {
        div.scroll { table {
            thead { tr {
                th { "Operation" } th { "State" } th { "Target" } th { "Action" } th { "Pool" }
                @if with_build { th { "Build" } }
                th { "Executor" } th { "Queued" } th { "Took" } th { "Exit" }
            } }
            tbody {
                @for op in rows {
                    tr {
                        td.mono { a href=(operation_link(&op.name)) { (op.name.trim_start_matches("operations/").get(..8).unwrap_or("")) } }
                        td { (outcome_badge(op)) }
                        td { span.mono { (op.target_id) } @if !op.mnemonic.is_empty() { " " span.badge { (op.mnemonic) } } }
                        td.mono { (short_digest(&op.action_digest)) }
                        td { (op.pool) }
                        @if with_build {
                            td.mono { @if !op.invocation_id.is_empty() { a href=(build_link(&op.invocation_id)) { (op.invocation_id.get(..8).unwrap_or(&op.invocation_id)) } } }
                        }
                        td { (executor_of(op)) }
                        td { (since(op.queued_at)) }
                        td.num { (duration(elapsed(op))) }
                        td.num { (op.outcome.as_ref().and_then(|o| o.exit_code).map(|c| c.to_string()).unwrap_or_default()) }
                    }
                }
            }
        } }
    }
}

fn executor_of(op: &OperationSummary) -> String {
    op.outcome
        .as_ref()
        .map(|o| o.worker.clone())
        .filter(|w| !w.is_empty())
        .or_else(|| op.started.as_ref().map(|(_, e)| e.clone()))
        .unwrap_or_default()
}

/// One build's actions (of organisation `org`), failures first, then the
/// slowest.
pub fn build(scheduler: &Scheduler, id: &str, org: &str) -> Page {
    let all = operations_of(scheduler, org);
    let mut ops: Vec<&OperationSummary> = all.iter().filter(|o| o.invocation_id == id).collect();
    let rank = |op: &OperationSummary| match op.outcome.as_ref().map(|o| o.class) {
        Some(OutcomeClass::Failed | OutcomeClass::Error | OutcomeClass::Timeout) => 0,
        Some(OutcomeClass::Cancelled) => 1,
        None => 2,
        Some(_) => 3,
    };
    ops.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| elapsed(b).cmp(&elapsed(a)))
    });
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for op in &ops {
        let name = op
            .outcome
            .as_ref()
            .map_or(op.stage.name(), |o| o.class.name());
        *counts.entry(name).or_default() += 1;
    }
    let live = ops.iter().any(|o| o.outcome.is_none());
    let main = html! {
        h1 { "Build " span.mono { (id) } }
        div.cards {
            div.card { div.value { (ops.len()) } div.label { "actions kept" } }
            @for (name, n) in &counts {
                div.card { div.value { (n) } div.label { (name) } }
            }
        }
        h2 { "Actions (failures first, then the slowest)" }
        (operation_table(ops.iter(), false))
    };
    Page {
        title: format!("Build {id}"),
        main,
        live,
    }
}

/// What the action page reads from the CAS.
pub struct ActionBlobs {
    pub action: Option<reapi::Action>,
    pub command: Option<reapi::Command>,
    /// The first page of stdout and stderr.
    pub stdout: Option<LogPage>,
    pub stderr: Option<LogPage>,
}

/// A page of a log: its text and where it sits in the whole.
pub struct LogPage {
    pub text: String,
    pub offset: u64,
    pub total: u64,
}

/// Reads the Action, Command and first log pages of `detail`.
pub async fn action_blobs(storage: &Storage, detail: &OperationDetail) -> ActionBlobs {
    let function = DigestFunction::Sha256;
    let action: Option<reapi::Action> =
        read_message(storage, function, &detail.summary.action_digest).await;
    let command = match &action {
        Some(action) => match &action.command_digest {
            Some(digest) => read_message(storage, function, digest).await,
            None => None,
        },
        None => None,
    };
    let result = detail.response.as_ref().and_then(|r| r.result.as_ref());
    let (stdout, stderr) = match result {
        Some(result) => (
            log_page(
                storage,
                &result.stdout_raw,
                result.stdout_digest.as_ref(),
                0,
            )
            .await,
            log_page(
                storage,
                &result.stderr_raw,
                result.stderr_digest.as_ref(),
                0,
            )
            .await,
        ),
        None => (None, None),
    };
    ActionBlobs {
        action,
        command,
        stdout,
        stderr,
    }
}

async fn read_message<M: Message + Default>(
    storage: &Storage,
    function: DigestFunction,
    digest: &reapi::Digest,
) -> Option<M> {
    let digest = parse_digest(function, Some(digest), "digest").ok()?;
    if digest.size > kiln_proto::MAX_MESSAGE_BLOB_BYTES {
        return None;
    }
    let data = storage.read_small(&digest).await.ok()?;
    M::decode(data).ok()
}

/// `LOG_PAGE_BYTES` of a log from `offset`: inline bytes, or from the CAS.
pub async fn log_page(
    storage: &Storage,
    raw: &[u8],
    digest: Option<&reapi::Digest>,
    offset: u64,
) -> Option<LogPage> {
    if !raw.is_empty() {
        let total = raw.len() as u64;
        let start = offset.min(total) as usize;
        let end = (offset + LOG_PAGE_BYTES).min(total) as usize;
        return Some(LogPage {
            text: String::from_utf8_lossy(&raw[start..end]).into_owned(),
            offset,
            total,
        });
    }
    let digest: Digest = parse_digest(DigestFunction::Sha256, digest, "log digest").ok()?;
    if digest.size == 0 {
        return None;
    }
    let blob = storage.open(&digest).await.ok()??;
    let total = blob.len();
    let offset = offset.min(total);
    let len = LOG_PAGE_BYTES.min(total - offset);
    let data = tokio::task::spawn_blocking(move || blob.read_range(offset, len))
        .await
        .ok()?
        .ok()?;
    Some(LogPage {
        text: String::from_utf8_lossy(&data).into_owned(),
        offset,
        total,
    })
}

fn property_rows(properties: &[(String, String)]) -> Markup {
    html! {
        @for (name, value) in properties {
            tr {
                td.mono { (name) }
                td.mono {
                    @if kiln_platform::is_secret_key(name) { span.muted { "<redacted>" } } @else { (value) }
                }
            }
        }
    }
}

/// One action: what ran, where, how long each phase took, and how it
/// ended, with its logs and outputs.
pub fn action(detail: &OperationDetail, blobs: &ActionBlobs) -> Page {
    let op = &detail.summary;
    let id = op.name.trim_start_matches("operations/");
    let response = detail.response.as_ref();
    let result = response.and_then(|r| r.result.as_ref());
    let metadata = result.and_then(|r| r.execution_metadata.as_ref());
    let outcome = op.outcome.as_deref();
    let main = html! {
        h1 {
            @if op.target_id.is_empty() { "Action " span.mono { (short_digest(&op.action_digest)) } }
            @else { span.mono { (op.target_id) } }
            " " (outcome_badge(op))
        }
        @if let Some(why) = &detail.why_queued {
            p.why { strong { "Why is this still queued? " } (why) }
        }
        dl.facts {
            @if !op.target_id.is_empty() { dt { "Target" } dd.mono { (op.target_id) } }
            @if !op.mnemonic.is_empty() { dt { "Mnemonic" } dd { (op.mnemonic) } }
            dt { "Operation" } dd.mono { (op.name) }
            @if let Some(first) = &op.merged_into {
                dt { "Execution" } dd {
                    "shared: merged into the identical action in flight of operation "
                    a.mono href=(operation_link(first)) { (first) }
                }
            }
            dt { "Action digest" } dd.mono { (op.action_digest.hash) "/" (op.action_digest.size_bytes) }
            @if !op.instance_name.is_empty() { dt { "Instance" } dd.mono { (op.instance_name) } }
            dt { "Build" } dd.mono {
                @if op.invocation_id.is_empty() { span.muted { "none sent" } }
                @else { a href=(build_link(&op.invocation_id)) { (op.invocation_id) } }
            }
            dt { "Pool" } dd { (op.pool) }
            dt { "Queued" } dd { (format::timestamp(op.queued_at)) " (" (since(op.queued_at)) ")" }
            dt { "Executor" } dd { (executor_of(op)) @if op.attempts > 1 { " (attempt " (op.attempts) ")" } }
            dt { "Isolation" } dd {
                (outcome.and_then(|o| o.isolation.clone()).or_else(|| op.requested_isolation.map(|t| t.name().to_string())).unwrap_or_else(|| "executor default".into()))
                @match outcome.and_then(|o| o.warm) {
                    Some(true) => { " · " span.badge.ok { "warm runner" } }
                    Some(false) => { " · " span.badge { "fresh runner" } }
                    None => {}
                }
            }
            @if let Some(outcome) = outcome {
                dt { "Status" } dd {
                    (crate::rpc::code_name(outcome.code))
                    @if !outcome.message.is_empty() { ": " span.mono { (outcome.message) } }
                }
                dt { "Exit code" } dd { (outcome.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "–".into())) }
            }
            @if let Some(action) = &blobs.action {
                dt { "Timeout" } dd { (action.timeout.as_ref().map(|t| duration(std::time::Duration::from_secs(t.seconds.max(0) as u64))).unwrap_or_else(|| "server default".into())) }
                dt { "Cacheable" } dd { @if action.do_not_cache { "no (do_not_cache)" } @else { "yes" } }
            }
            @if response.is_some_and(|r| r.cached_result) {
                dt { "Cache" } dd { "answered from the Action Cache; the times below are the original run's" }
            }
        }
        @if let Some(metadata) = metadata { (timeline(metadata)) }
        h2 { "Command" }
        @match &blobs.command {
            Some(command) => {
                pre { (shell_words(&command.arguments)) }
                @if !command.working_directory.is_empty() { p { "Working directory: " code { (command.working_directory) } } }
                @if !command.environment_variables.is_empty() {
                    h2 { "Environment" }
                    div.scroll { table { tbody {
                        @for var in &command.environment_variables { tr { td.mono { (var.name) } td.mono { (var.value) } } }
                    } } }
                }
                @let outputs = declared_outputs(command);
                @if !outputs.is_empty() {
                    p { "Declared outputs: " @for (i, path) in outputs.iter().enumerate() { @if i > 0 { ", " } code { (path) } } }
                }
            }
            None => { p.muted { "The Command is not in the CAS (any more)." } }
        }
        h2 { "Platform" }
        div.scroll { table {
            thead { tr { th { "Property" } th { "Value" } } }
            tbody {
                (property_rows(&detail.command_properties))
                (property_rows(&detail.action_properties))
                @for name in &detail.header_property_names {
                    tr { td.mono { (name) " " span.badge { "header" } } td.mono { span.muted { "<redacted>" } } }
                }
                @if detail.command_properties.is_empty() && detail.action_properties.is_empty() && detail.header_property_names.is_empty() {
                    tr { td.muted colspan="2" { "none" } }
                }
            }
        } }
        @if let Some(result) = result {
            (log_section("stdout", id, &blobs.stdout))
            (log_section("stderr", id, &blobs.stderr))
            (outputs_section(result))
        }
    };
    Page {
        title: if op.target_id.is_empty() {
            format!("Action {}", short_digest(&op.action_digest))
        } else {
            format!("{} {}", op.mnemonic, op.target_id)
        },
        main,
        live: op.outcome.is_none(),
    }
}

fn log_section(name: &str, id: &str, page: &Option<LogPage>) -> Markup {
    html! {
        h2 { (name) }
        @match page {
            None => { p.muted { "empty" } }
            Some(page) => {
                pre.log { (page.text) }
                @if page.total > page.offset + LOG_PAGE_BYTES {
                    p { a href={"/operation/" (id) "/" (name) "?offset=" (page.offset + LOG_PAGE_BYTES)} { "next page" } " of " (bytes(page.total)) }
                }
            }
        }
    }
}

fn outputs_section(result: &reapi::ActionResult) -> Markup {
    let link = |digest: &Option<reapi::Digest>, path: &str| -> Markup {
        match digest {
            Some(d) => {
                html! { a href={"/blob/" (d.hash) "/" (d.size_bytes) "?name=" (query_escape(path.rsplit('/').next().unwrap_or(path)))} { (path) } }
            }
            None => html! { (path) },
        }
    };
    html! {
        h2 { "Outputs" }
        @if result.output_files.is_empty() && result.output_directories.is_empty() && result.output_symlinks.is_empty() {
            p.muted { "none" }
        } @else {
            div.scroll { table {
                thead { tr { th { "Path" } th { "Kind" } th { "Size" } } }
                tbody {
                    @for file in &result.output_files {
                        tr { td.mono { (link(&file.digest, &file.path)) } td { "file" @if file.is_executable { " (executable)" } } td.num { (file.digest.as_ref().map(|d| bytes(d.size_bytes.max(0) as u64)).unwrap_or_default()) } }
                    }
                    @for dir in &result.output_directories {
                        tr { td.mono { (link(&dir.tree_digest, &dir.path)) } td { "directory (Tree)" } td.num { (dir.tree_digest.as_ref().map(|d| bytes(d.size_bytes.max(0) as u64)).unwrap_or_default()) } }
                    }
                    @for link in &result.output_symlinks {
                        tr { td.mono { (link.path) } td { "symlink → " code { (link.target) } } td {} }
                    }
                }
            } }
        }
    }
}

/// The phases of `metadata` as a bar and a table.
fn timeline(metadata: &reapi::ExecutedActionMetadata) -> Markup {
    let lengths: Vec<(&str, f64)> = crate::metrics::phases(metadata)
        .into_iter()
        .filter_map(|(name, seconds)| Some((name, seconds?)))
        .collect();
    let total: f64 = lengths.iter().map(|(_, s)| s).sum();
    html! {
        h2 { "Timeline" }
        @if total > 0.0 {
            div.timeline role="img" aria-label="phases" {
                @for (name, seconds) in &lengths {
                    span class={"phase-" (name)} style={"width:" (format!("{:.2}", seconds / total * 100.0)) "%"} title={(name) " " (duration(Duration::from_secs_f64(*seconds)))} {}
                }
            }
        }
        div.scroll { table {
            thead { tr { th { "Phase" } th { "Took" } } }
            tbody {
                @for (name, seconds) in &lengths {
                    tr { td { span.legend { span class={"phase-" (name)} {} } (name.replace('_', " ")) } td.num { (duration(Duration::from_secs_f64(*seconds))) } }
                }
                @if !metadata.worker.is_empty() { tr { td { "worker" } td.num { (metadata.worker) } } }
            }
        } }
    }
}

/// Every output path `command` declares, in the current and the
/// deprecated fields (Bazel 4 sends the latter).
#[allow(deprecated)]
fn declared_outputs(command: &reapi::Command) -> Vec<&String> {
    command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories)
        .collect()
}

/// `arguments` as one shell line, quoted where needed.
fn shell_words(arguments: &[String]) -> String {
    arguments
        .iter()
        .map(|arg| {
            if !arg.is_empty()
                && arg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                arg.clone()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A page of stdout or stderr, with links to the pages around it.
pub fn log(detail: &OperationDetail, name: &str, page: Option<LogPage>) -> Page {
    let id = detail.summary.name.trim_start_matches("operations/");
    let main = html! {
        h1 { (name) " of " a href=(operation_link(&detail.summary.name)) { "action " (short_digest(&detail.summary.action_digest)) } }
        @match &page {
            None => { p.muted { "empty" } }
            Some(page) => {
                p.muted { "bytes " (page.offset) "–" (page.offset + page.text.len() as u64) " of " (page.total) }
                div.pager {
                    @if page.offset > 0 { a href={"/operation/" (id) "/" (name) "?offset=" (page.offset.saturating_sub(LOG_PAGE_BYTES))} { "← previous page" } }
                    @if page.offset + LOG_PAGE_BYTES < page.total { a href={"/operation/" (id) "/" (name) "?offset=" (page.offset + LOG_PAGE_BYTES)} { "next page →" } }
                }
                pre.log { (page.text) }
            }
        }
    };
    Page {
        title: format!("{name} of {}", short_digest(&detail.summary.action_digest)),
        main,
        live: false,
    }
}

/// The page for a request the UI cannot answer.
pub fn not_found(what: &str) -> Page {
    Page {
        title: "Not found".into(),
        main: html! { h1 { "Not found" } p { (what) } p { a href="/operations" { "All operations" } } },
        live: false,
    }
}
