//! The API server side of identity: ServiceAccount reads and TokenRequests bound to the pod.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

use super::kube2iam::Namespaces;
use super::{IdentityError, Secret, ServiceAccounts, TokenMinter};
use crate::pods::PodInfo;

/// ServiceAccount reads and TokenRequests through a kube client.
#[derive(Clone)]
pub(crate) struct ApiServer {
    client: kube::Client,
}

impl ApiServer {
    pub(crate) fn new(client: kube::Client) -> Self {
        ApiServer { client }
    }
}

fn kube_error(e: kube::Error) -> IdentityError {
    match e {
        kube::Error::Api(s) => IdentityError::Kube {
            status: Some(s.code),
            message: s.message.clone(),
        },
        other => IdentityError::Kube {
            status: None,
            message: other.to_string(),
        },
    }
}

impl ServiceAccounts for ApiServer {
    fn annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
        Box::pin(async move {
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
            let sa = api.get_opt(name).await.map_err(kube_error)?;
            Ok(sa.map(|sa| sa.metadata.annotations.unwrap_or_default()))
        })
    }
}

impl Namespaces for ApiServer {
    fn annotations<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, IdentityError>> {
        Box::pin(async move {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let ns = api.get_opt(name).await.map_err(kube_error)?;
            Ok(ns.map(|ns| ns.metadata.annotations.unwrap_or_default()))
        })
    }
}

impl TokenMinter for ApiServer {
    fn mint<'a>(
        &'a self,
        pod: &'a PodInfo,
        audience: &'a str,
        expiration_secs: i64,
    ) -> BoxFuture<'a, Result<Secret, IdentityError>> {
        Box::pin(async move {
            let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &pod.namespace);
            let req = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![audience.to_string()],
                    expiration_seconds: Some(expiration_secs),
                    // Bound to the pod: the token dies with it, and the API server refuses to mint
                    // one for a pod uid that no longer exists.
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod.name.clone()),
                        uid: Some(pod.uid.clone()),
                    }),
                },
                ..Default::default()
            };
            let resp = api
                .create_token_request(&pod.service_account, &PostParams::default(), &req)
                .await
                .map_err(|e| match kube_error(e) {
                    IdentityError::Kube {
                        status: Some(404), ..
                    } => IdentityError::PodGone {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    },
                    other => other,
                })?;
            let token = resp
                .status
                .map(|s| s.token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| IdentityError::Kube {
                    status: None,
                    message: "TokenRequest returned no token".into(),
                })?;
            Ok(Secret::new(token))
        })
    }
}
