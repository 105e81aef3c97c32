//! The Capabilities service: what this server really offers.

use kiln_proto::reapi::{self, capabilities_server::Capabilities};
use kiln_proto::semver::SemVer;
use kiln_store::{DigestFunction, Retention};
use tonic::{Request, Response, Status};

use crate::storage::StorageLimits;
use crate::wire::digest_function_to_wire;

pub struct CapabilitiesService {
    limits: StorageLimits,
    /// Set by the execution service when it is mounted.
    execution: Option<reapi::ExecutionCapabilities>,
}

impl CapabilitiesService {
    pub fn new(limits: StorageLimits, execution: Option<reapi::ExecutionCapabilities>) -> Self {
        CapabilitiesService { limits, execution }
    }
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let zstd = reapi::compressor::Value::Zstd as i32;
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: DigestFunction::ALL
                    .into_iter()
                    .map(digest_function_to_wire)
                    .collect(),
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                // `results_cache_policy.priority`: values beyond are clamped.
                cache_priority_capabilities: Some(reapi::PriorityCapabilities {
                    priorities: vec![reapi::priority_capabilities::PriorityRange {
                        min_priority: -i32::from(Retention::MAX_EPOCHS),
                        max_priority: i32::from(Retention::MAX_EPOCHS),
                    }],
                }),
                max_batch_total_size_bytes: self.limits.max_batch_total_size_bytes as i64,
                symlink_absolute_path_strategy:
                    reapi::symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![zstd],
                supported_batch_update_compressors: vec![zstd],
                ..Default::default()
            }),
            execution_capabilities: self.execution.clone(),
            deprecated_api_version: None,
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}
