//! The owner of every replica object (`--kube-owner deployment/NAME`):
//! usually the executor's own Deployment, so that deleting it (uninstalling
//! the Helm release) lets Kubernetes' garbage collector delete the
//! replicas, while an executor restart or upgrade leaves them running.
//!
//! The reference is neither a controller (the executor's Deployment does
//! not manage replica pods) nor blocking: deleting the owner in the
//! foreground does not wait for the replicas.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DynamicObject};

/// The kinds an owner may be, as `--kube-owner` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Pod,
}

impl OwnerKind {
    fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Self::Deployment => ("apps", "v1", "Deployment", "deployments"),
            Self::StatefulSet => ("apps", "v1", "StatefulSet", "statefulsets"),
            Self::DaemonSet => ("apps", "v1", "DaemonSet", "daemonsets"),
            Self::Pod => ("", "v1", "Pod", "pods"),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() {
                version.into()
            } else {
                format!("{group}/{version}")
            },
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

/// `deployment/NAME` (or `statefulset/`, `daemonset/`, `pod/`; kinds as
/// kubectl writes them, in any case) as its kind and name.
pub fn parse_owner(text: &str) -> Result<(OwnerKind, String), String> {
    let (kind, name) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not KIND/NAME such as deployment/flotilla-executor"))?;
    let kind = match kind.to_ascii_lowercase().as_str() {
        "deployment" | "deployments" | "deploy" => OwnerKind::Deployment,
        "statefulset" | "statefulsets" | "sts" => OwnerKind::StatefulSet,
        "daemonset" | "daemonsets" | "ds" => OwnerKind::DaemonSet,
        "pod" | "pods" | "po" => OwnerKind::Pod,
        other => {
            return Err(format!(
                "{text:?}: kind {other:?} cannot own replicas; use deployment, statefulset, \
                 daemonset or pod"
            ));
        }
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        return Err(format!(
            "{text:?}: {name:?} is not a Kubernetes object name (lower case letters, digits, \
             '-' and '.')"
        ));
    }
    Ok((kind, name.to_string()))
}

/// The owner reference to `kind_and_name` (`deployment/flotilla-executor`)
/// in `namespace`, read from the API server for its uid. Dependents must
/// be in the owner's namespace: the replicas' namespace. A malformed name
/// or an owner without a uid is a [`kube::Error::Service`] saying so.
pub async fn owner_reference(
    client: &kube::Client,
    namespace: &str,
    kind_and_name: &str,
) -> Result<OwnerReference, kube::Error> {
    let (kind, name) = parse_owner(kind_and_name)
        .map_err(|e| kube::Error::Service(format!("--kube-owner: {e}").into()))?;
    let resource = kind.resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let owner = api.get(&name).await?;
    let uid = owner
        .metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            kube::Error::Service(
                format!(
                    "--kube-owner: {} {namespace}/{name} has no uid",
                    resource.kind
                )
                .into(),
            )
        })?;
    Ok(OwnerReference {
        api_version: resource.api_version,
        kind: resource.kind,
        name,
        uid,
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type ApiHandle = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    fn client() -> (kube::Client, ApiHandle) {
        let (service, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        (kube::Client::new(service, "default"), handle)
    }

    /// Answers the next request with `status` and `body`; returns its
    /// method and path.
    async fn answer(handle: &mut ApiHandle, status: u16, body: serde_json::Value) -> String {
        let (request, reply) = handle.next_request().await.expect("a request");
        let line = format!("{} {}", request.method(), request.uri().path());
        reply.send_response(
            http::Response::builder()
                .status(status)
                .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        line
    }

    #[tokio::test]
    async fn the_owner_is_read_for_its_uid() {
        let (client, mut api) = client();
        let server = tokio::spawn(async move {
            answer(
                &mut api,
                200,
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "flotilla-executor", "namespace": "flotilla",
                                 "uid": "0d6c2a51-7b2e-4c8e-9f51-3a1d9a0e4b77"},
                    "spec": {"selector": {}, "template": {}},
                }),
            )
            .await
        });
        let owner = owner_reference(&client, "flotilla", "deployment/flotilla-executor")
            .await
            .unwrap();
        assert_eq!(
            server.await.unwrap(),
            "GET /apis/apps/v1/namespaces/flotilla/deployments/flotilla-executor"
        );
        assert_eq!(
            owner,
            OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: "flotilla-executor".into(),
                uid: "0d6c2a51-7b2e-4c8e-9f51-3a1d9a0e4b77".into(),
                controller: Some(false),
                block_owner_deletion: Some(false),
            }
        );
    }

    #[tokio::test]
    async fn a_pod_owner_is_a_core_object() {
        let (client, mut api) = client();
        let server = tokio::spawn(async move {
            answer(
                &mut api,
                200,
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "executor-0", "uid": "u-1"}}),
            )
            .await
        });
        let owner = owner_reference(&client, "ml", "pod/executor-0")
            .await
            .unwrap();
        assert_eq!(
            server.await.unwrap(),
            "GET /api/v1/namespaces/ml/pods/executor-0"
        );
        assert_eq!(
            (owner.api_version.as_str(), owner.kind.as_str()),
            ("v1", "Pod")
        );
    }

    #[tokio::test]
    async fn a_missing_owner_is_the_api_servers_404() {
        let (client, mut api) = client();
        let server = tokio::spawn(async move {
            answer(
                &mut api,
                404,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "deployments.apps \"gone\" not found", "reason": "NotFound",
                       "code": 404}),
            )
            .await
        });
        let e = owner_reference(&client, "flotilla", "deployment/gone")
            .await
            .unwrap_err();
        server.await.unwrap();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e}");
    }

    #[tokio::test]
    async fn a_malformed_owner_is_refused_without_asking() {
        let (client, _api) = client();
        for bad in [
            "flotilla-executor",
            "service/x",
            "deployment/",
            "deployment/Upper",
        ] {
            let e = owner_reference(&client, "flotilla", bad).await.unwrap_err();
            assert!(e.to_string().contains("--kube-owner"), "{bad}: {e}");
        }
    }

    #[test]
    fn owners_parse_as_kubectl_names_them() {
        assert_eq!(
            parse_owner("deployment/flotilla-executor").unwrap(),
            (OwnerKind::Deployment, "flotilla-executor".to_string())
        );
        assert_eq!(parse_owner("sts/x").unwrap().0, OwnerKind::StatefulSet);
        assert_eq!(parse_owner("DaemonSet/x").unwrap().0, OwnerKind::DaemonSet);
        assert!(parse_owner("job/x").unwrap_err().contains("cannot own"));
    }
}
