//! The gRPC edge: REAPI `Execution` (Execute, WaitExecution) and
//! `google.longrunning.Operations` over one [`Scheduler`]. Request headers
//! carrying platform properties are read here and handed on; they are
//! never logged.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_proto::longrunning::{self, operations_server::Operations, Operation};
use kiln_proto::protobuf::Empty;
use kiln_proto::reapi::{self, execution_server::Execution};
use prost::Message;
use tonic::{Request, Response, Status};

use kiln_auth::Caller;

use crate::operation::OperationWatch;
use crate::report::Client;
use crate::scheduler::Scheduler;

/// What Capabilities says about execution when it is on: SHA-256 (the
/// digest function the executors hash outputs with).
pub fn execution_capabilities() -> reapi::ExecutionCapabilities {
    let sha256 = reapi::digest_function::Value::Sha256 as i32;
    reapi::ExecutionCapabilities {
        digest_function: sha256,
        exec_enabled: true,
        execution_priority_capabilities: None,
        supported_node_properties: vec![],
        digest_functions: vec![sha256],
    }
}

pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Streams the operation's states: `first` (or the current one) at once,
/// then every change, ending after the one that is done.
fn operation_stream(first: Option<Operation>, watch: OperationWatch) -> OperationStream {
    struct Cursor {
        watch: OperationWatch,
        first: Option<Operation>,
        last: Option<Operation>,
    }
    let cursor = Cursor {
        watch,
        first,
        last: None,
    };
    Box::pin(futures::stream::unfold(cursor, |mut cursor| async move {
        if cursor.last.as_ref().is_some_and(|last| last.done) {
            return None;
        }
        let next = match cursor.first.take() {
            Some(first) => first,
            None => loop {
                let current = cursor.watch.borrow_and_update().clone();
                if cursor.last.as_ref() != Some(&current) {
                    break current;
                }
                if cursor.watch.changed().await.is_err() {
                    // The scheduler dropped the operation without completing it.
                    let error = Status::aborted("the operation was dropped by the scheduler");
                    let mut ended = current;
                    ended.done = true;
                    cursor.last = Some(ended);
                    return Some((Err(error), cursor));
                }
            },
        };
        cursor.last = Some(next.clone());
        Some((Ok(next), cursor))
    }))
}

pub struct ExecutionService {
    scheduler: Arc<Scheduler>,
}

impl ExecutionService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        ExecutionService { scheduler }
    }
}

/// REAPI's RequestMetadata header, sent by Bazel with every call.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// Who sent the request: its caller's organisation, and its
/// RequestMetadata (all empty if absent).
fn client_of<T>(request: &Request<T>) -> Client {
    let metadata = request
        .metadata()
        .get_bin(REQUEST_METADATA_HEADER)
        .and_then(|value| value.to_bytes().ok())
        .and_then(|bytes| reapi::RequestMetadata::decode(bytes).ok())
        .unwrap_or_default();
    Client::new(
        Caller::org_of(request),
        metadata.tool_invocation_id,
        metadata.target_id,
        metadata.action_mnemonic,
    )
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let headers = kiln_cas::platform_headers(request.metadata());
        let client = client_of(&request);
        let (first, watch) = self
            .scheduler
            .execute(request.into_inner(), &headers, &client)
            .await?;
        Ok(Response::new(operation_stream(Some(first), watch)))
    }

    async fn wait_execution(
        &self,
        request: Request<reapi::WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let org = Caller::org_of(&request);
        let watch = self.scheduler.watch(&request.into_inner().name, &org)?;
        Ok(Response::new(operation_stream(None, watch)))
    }
}

pub struct OperationsService {
    scheduler: Arc<Scheduler>,
}

impl OperationsService {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        OperationsService { scheduler }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<longrunning::ListOperationsRequest>,
    ) -> Result<Response<longrunning::ListOperationsResponse>, Status> {
        let org = Caller::org_of(&request);
        let page_size = request.into_inner().page_size;
        let limit = if page_size <= 0 {
            1000
        } else {
            page_size as usize
        };
        Ok(Response::new(longrunning::ListOperationsResponse {
            operations: self.scheduler.list(limit, &org),
            next_page_token: String::new(),
            unreachable: vec![],
        }))
    }

    async fn get_operation(
        &self,
        request: Request<longrunning::GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let org = Caller::org_of(&request);
        let watch = self.scheduler.watch(&request.into_inner().name, &org)?;
        let operation = watch.borrow().clone();
        Ok(Response::new(operation))
    }

    async fn delete_operation(
        &self,
        request: Request<longrunning::DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let org = Caller::org_of(&request);
        self.scheduler.delete(&request.into_inner().name, &org)?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<longrunning::CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let org = Caller::org_of(&request);
        self.scheduler.cancel(&request.into_inner().name, &org)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<longrunning::WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let org = Caller::org_of(&request);
        let request = request.into_inner();
        let mut watch = self.scheduler.watch(&request.name, &org)?;
        let wait = async {
            while !watch.borrow_and_update().done {
                if watch.changed().await.is_err() {
                    break;
                }
            }
        };
        let timeout = request
            .timeout
            .map(|t| std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .unwrap_or(std::time::Duration::from_secs(60));
        let _ = tokio::time::timeout(timeout, wait).await;
        let operation = watch.borrow().clone();
        Ok(Response::new(operation))
    }
}
