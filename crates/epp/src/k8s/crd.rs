//! The Gateway API Inference Extension resources the EPP reads.
//!
//! Only the fields the EPP uses, plus what a CRD generated from these types needs to hold the
//! upstream objects; unknown fields of real objects are ignored on read. The EPP never writes
//! these objects (status belongs to gateway controllers).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `inference.networking.k8s.io/v1`, the GA pool.
pub mod v1 {
    use super::*;

    /// A pool of model-server pods selected by labels, served on up to 8 target ports, with
    /// the EPP that picks among them.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[kube(
        group = "inference.networking.k8s.io",
        version = "v1",
        kind = "InferencePool",
        plural = "inferencepools",
        shortname = "infpool",
        namespaced,
        status = "InferencePoolStatus"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        /// Pods of the pool, in the pool's namespace.
        pub selector: LabelSelector,
        /// Ports the model servers listen on (1 to 8); each (pod, port) is an endpoint.
        #[schemars(length(min = 1, max = 8))]
        pub target_ports: Vec<Port>,
        /// The EPP serving this pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub endpoint_picker_ref: Option<EndpointPickerRef>,
        /// Protocol towards the model servers (`http` or `kubernetes.io/h2c`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub app_protocol: Option<String>,
    }

    /// `matchLabels` only, as the API defines it.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelSelector {
        /// Labels a pod must carry.
        #[serde(default)]
        pub match_labels: BTreeMap<String, String>,
    }

    /// A port number.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
    pub struct Port {
        /// 1–65535.
        #[schemars(range(min = 1, max = 65535))]
        pub number: i32,
    }

    /// Reference to the EPP.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointPickerRef {
        /// API group of the referent (default core).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        /// Kind of the referent (default `Service`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        /// Name of the referent.
        pub name: String,
        /// Service port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port: Option<Port>,
        /// `FailOpen` or `FailClose` (default): what the gateway does when the EPP is down.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub failure_mode: Option<String>,
    }

    /// Written by gateway controllers; the EPP never writes it.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolStatus {
        /// Per-parent status.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub parents: Vec<ParentStatus>,
    }

    /// Status of the pool towards one parent (gateway).
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ParentStatus {
        /// The parent.
        pub parent_ref: ParentReference,
        /// Conditions (`Accepted`, `ResolvedRefs`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
        /// Controller that wrote this entry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub controller_name: Option<String>,
    }

    /// A gateway.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    pub struct ParentReference {
        /// Group (default `gateway.networking.k8s.io`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        /// Kind (default `Gateway`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        /// Name.
        pub name: String,
        /// Namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespace: Option<String>,
    }
}

/// `inference.networking.x-k8s.io/v1alpha2`: the legacy pool (selected with `--pool-group`)
/// and InferenceObjective.
pub mod v1alpha2 {
    use super::*;

    /// The pre-GA pool: a plain label map and a single target port.
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferencePool",
        plural = "inferencepools",
        namespaced
    )]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        /// Labels a pod must carry.
        pub selector: BTreeMap<String, String>,
        /// The model servers' port.
        #[schemars(range(min = 1, max = 65535))]
        pub target_port_number: i32,
        /// The EPP serving this pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub extension_ref: Option<ExtensionRef>,
    }

    /// Reference to the EPP (legacy form).
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ExtensionRef {
        /// Group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        /// Kind.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        /// Name.
        pub name: String,
        /// Port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port_number: Option<i32>,
        /// `FailOpen` or `FailClose`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub failure_mode: Option<String>,
    }

    /// How important requests naming this objective are (`x-llm-d-inference-objective`, or its alias `x-gateway-inference-objective`).
    #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceObjective",
        plural = "inferenceobjectives",
        namespaced,
        printcolumn = r#"{"name":"Inference Pool","type":"string","jsonPath":".spec.poolRef.name"}"#,
        printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#
    )]
    #[serde(rename_all = "camelCase")]
    pub struct InferenceObjectiveSpec {
        /// Higher is more important; negative is sheddable; unset is 0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub priority: Option<i32>,
        /// The pool (same namespace).
        pub pool_ref: PoolRef,
    }

    /// Reference to a pool.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    pub struct PoolRef {
        /// Group (default `inference.networking.k8s.io`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        /// Kind (default `InferencePool`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        /// Name.
        pub name: String,
    }
}

/// The CRDs of these types, as YAML documents (`manifests/crds/`).
pub fn crd_yaml() -> Vec<(String, String)> {
    use kube::CustomResourceExt;
    [
        v1::InferencePool::crd(),
        v1alpha2::InferencePool::crd(),
        v1alpha2::InferenceObjective::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let file = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
        let yaml = serde_yaml::to_string(&crd).unwrap_or_default();
        (file, yaml)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_objects_parse() {
        let pool: v1::InferencePool = serde_yaml::from_str(
            "apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: mistral, namespace: default}
spec:
  targetPorts: [{number: 8080}]
  selector: {matchLabels: {app: mistral-upstream}}
  endpointPickerRef: {name: mistral-epp, port: {number: 9002}}
status:
  parents:
  - parentRef: {name: gw}
    conditions:
    - {type: Accepted, status: 'True', reason: Accepted, message: '', lastTransitionTime: '2025-01-01T00:00:00Z'}
",
        )
        .unwrap();
        assert_eq!(pool.spec.target_ports[0].number, 8080);
        assert_eq!(pool.spec.selector.match_labels["app"], "mistral-upstream");
        let obj: v1alpha2::InferenceObjective = serde_yaml::from_str(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: mistral, namespace: default}
spec: {priority: 10, poolRef: {name: mistral}}
",
        )
        .unwrap();
        assert_eq!(obj.spec.priority, Some(10));
    }
}
