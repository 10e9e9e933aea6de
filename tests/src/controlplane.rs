//! A real Kubernetes control plane for the test bed: `etcd` and `kube-apiserver` (built from their
//! Go modules by `tests/setup-controlplane.sh` into `$IRSA_TESTBED_CACHE/bin`), started on loopback
//! (the machine's, or a test's node network namespace's: [`ControlPlane::start_in_netns`]) with
//! free ports and a folder of their own, RBAC (`Node,RBAC`) and admission on (including
//! `ValidatingAdmissionPolicy`), a ServiceAccount signing key and issuer, an audit log of every
//! request a ServiceAccount makes, and an admin kubeconfig for the test.
//!
//! There is no kubelet, scheduler or controller-manager: the test plays the kubelet (creates pods
//! with `spec.nodeName`, patches their status through the status subresource, deletes them).
//!
//! In a node network namespace the servers listen on that namespace's loopback, where the agent
//! running in the namespace reaches them as on a real node; the test process, outside, reaches
//! the very same `https://127.0.0.1:<port>` through a bridge: a listener on the machine's
//! loopback, on the same port number, whose every connection is made again from inside the
//! namespace. So one URL (the apiserver's, its issuer's, etcd's) is right on both sides.
//!
//! Lifetime: an owned [`ControlPlane`] kills both processes and removes its folder on drop. The
//! per-binary [`ControlPlane::shared`] instance lives as long as the test process: its processes
//! are spawned by a thread that lives as long as the process, under `setpriv --pdeathsig KILL`,
//! so they die with it; its folder is removed by the next start (stale folders of dead processes).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::util::TempDir;

/// The audience the apiserver accepts for its own tokens (`--api-audiences`).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";
/// How long a cold kube-apiserver may take to become ready on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// `$IRSA_TESTBED_CACHE/bin` (default `/var/cache/irsa-imds-testbed/bin`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("IRSA_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/irsa-imds-testbed"))
        .join("bin")
}

/// Whether `etcd`, `kube-apiserver` and `kubectl` are built. Missing binaries are an error under
/// `CI=true` (those suites must fail there, never pass by skipping); elsewhere the caller skips
/// with the message printed here.
pub fn binaries_present() -> anyhow::Result<bool> {
    let missing: Vec<String> = ["etcd", "kube-apiserver", "kubectl"]
        .iter()
        .map(|b| bin_dir().join(b))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!(
        "control plane binaries missing ({}): run `bash tests/setup.sh`",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{msg} (CI=true: not skipping)");
    }
    eprintln!("SKIPPED: {msg}");
    Ok(false)
}

/// A running etcd + kube-apiserver.
pub struct ControlPlane {
    dir: TempDir,
    procs: Mutex<Vec<Child>>,
    /// The bridges into the node namespace (none on the machine's loopback); stopped on drop.
    _bridges: Vec<Bridge>,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// `http://127.0.0.1:<port>` (etcd's client URL, with its JSON gateway).
    pub etcd_url: String,
    /// The ServiceAccount token issuer (`--service-account-issuer`), = `url`.
    pub issuer: String,
    /// PEM bundle that verifies the apiserver's serving certificate.
    pub ca_pem: String,
    admin_token: String,
}

impl ControlPlane {
    /// One control plane per test binary, started by the first test that asks. `None` (after a
    /// printed notice) when the binaries are missing outside CI.
    pub async fn shared() -> anyhow::Result<Option<Arc<ControlPlane>>> {
        static SHARED: tokio::sync::OnceCell<Arc<ControlPlane>> =
            tokio::sync::OnceCell::const_new();
        if !binaries_present()? {
            return Ok(None);
        }
        let cp = SHARED
            .get_or_try_init(|| async { ControlPlane::start().await.map(Arc::new) })
            .await?;
        Ok(Some(cp.clone()))
    }

    /// A control plane of the caller's own on the machine's loopback (stopped and removed on
    /// drop).
    pub async fn start() -> anyhow::Result<ControlPlane> {
        Self::start_on(None).await
    }

    /// A control plane of the caller's own inside network namespace `netns` (a test's node),
    /// listening on its loopback and bridged to the same ports on the machine's loopback for the
    /// test itself (see the module docs). Stopped, bridges closed and folder removed on drop;
    /// the namespace stays the caller's.
    pub async fn start_in_netns(netns: &str) -> anyhow::Result<ControlPlane> {
        crate::netns::require_root()?;
        Self::start_on(Some(netns)).await
    }

    async fn start_on(netns: Option<&str>) -> anyhow::Result<ControlPlane> {
        crate::harness::install_crypto();
        sweep_stale_dirs();
        let dir = TempDir::new("cp")?;
        let d = dir.path().to_path_buf();
        // In a namespace, the bridges hold the machine-side ports first; the namespace is the
        // test's own, so the same numbers are free in it.
        let (bridges, [etcd_port, peer_port, api_port]) = match netns {
            None => (Vec::new(), free_ports()?),
            Some(ns) => {
                let api = Bridge::start(ns)?;
                let etcd = Bridge::start(ns)?;
                let [peer] = free_ports()?;
                let ports = [etcd.port, peer, api.port];
                (vec![api, etcd], ports)
            }
        };
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let url = format!("https://127.0.0.1:{api_port}");
        let admin_token = hex(&random_bytes::<24>()?);

        let key = d.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::piped())
            .output()
            .context("running openssl genrsa (Debian package openssl)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl genrsa: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            d.join("tokens.csv"),
            format!("{admin_token},testbed-admin,testbed-admin,system:masters\n"),
        )?;
        // Every request made as a ServiceAccount (the agent's, with its shipped RBAC), at
        // Metadata level: verb, resource, requestURI (field selectors), user, response code.
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n",
        )?;

        let mut cp = ControlPlane {
            dir,
            procs: Mutex::new(Vec::new()),
            _bridges: bridges,
            url: url.clone(),
            etcd_url: etcd_url.clone(),
            issuer: url.clone(),
            ca_pem: String::new(),
            admin_token,
        };

        let mut etcd = supervised(
            netns,
            &bin_dir().join("etcd"),
            &[
                "--name=testbed".into(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=testbed=http://127.0.0.1:{peer_port}"),
                // Test data: durability across power loss is not a property under test.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        etcd.stderr(log_file(&d.join("etcd.log"))?);
        cp.spawn(etcd)?;

        let mut api = supervised(
            netns,
            &bin_dir().join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", d.join("pki").display()),
                format!("--service-account-issuer={url}"),
                format!("--service-account-key-file={}", key.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                format!("--api-audiences={API_AUDIENCE}"),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=Node,RBAC".into(),
                // The DaemonSet's CNI install step is privileged, as on a real cluster.
                "--allow-privileged=true".into(),
                "--enable-admission-plugins=NodeRestriction,ValidatingAdmissionPolicy".into(),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                // Watches go to etcd, so an etcd compaction really forces 410 Gone on a resumed
                // watch (the watch cache would hide it behind its own window).
                "--watch-cache=false".into(),
                // The test compacts etcd itself, when it wants to.
                "--etcd-compaction-interval=0".into(),
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
                format!("--audit-log-path={}", d.join("audit.log").display()),
                format!(
                    "--audit-policy-file={}",
                    d.join("audit-policy.yaml").display()
                ),
                "--v=1".into(),
            ],
        );
        api.stderr(log_file(&d.join("kube-apiserver.log"))?);
        cp.spawn(api)?;

        let ca = d.join("pki/apiserver.crt");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !ca.exists() {
            cp.check_alive()?;
            if tokio::time::Instant::now() > deadline {
                bail!("kube-apiserver wrote no serving certificate within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cp.ca_pem = read_when_complete(&ca).await?;
        cp.write_kubeconfig(&cp.admin_kubeconfig(), &cp.admin_token.clone(), &cp.url)?;
        loop {
            cp.check_alive()?;
            if cp.ready().await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within {START_TIMEOUT:?}; log tail:\n{}",
                    cp.log_tail("kube-apiserver.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(cp)
    }

    async fn ready(&self) -> bool {
        let Ok(client) = self.admin_client().await else {
            return false;
        };
        let ns: Api<Namespace> = Api::all(client.clone());
        let req = http::Request::get("/readyz").body(Vec::new());
        let Ok(req) = req else { return false };
        matches!(client.request_text(req).await, Ok(t) if t.trim() == "ok")
            && ns.get_opt("kube-system").await.is_ok_and(|n| n.is_some())
            && ns.get_opt("default").await.is_ok_and(|n| n.is_some())
    }

    fn spawn(&self, cmd: Command) -> anyhow::Result<()> {
        let child = spawn_outliving_test_threads(cmd)?;
        self.procs
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(child);
        Ok(())
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().map_err(|_| anyhow!("poisoned"))?;
        for (i, p) in procs.iter_mut().enumerate() {
            if let Some(status) = p.try_wait()? {
                let log = if i == 0 {
                    "etcd.log"
                } else {
                    "kube-apiserver.log"
                };
                bail!(
                    "{log} process exited ({status}); log tail:\n{}",
                    self.log_tail(log)
                );
            }
        }
        Ok(())
    }

    /// The last lines of one of the control plane's logs (for failure messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin's bearer token (e.g. for the issuer's discovery endpoints).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A kube client acting as cluster admin (system:masters).
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        self.client_with_token(&self.admin_token, &self.url).await
    }

    /// A kube client for `server` (the apiserver, or a proxy in front of it) with `token`.
    pub async fn client_with_token(
        &self,
        token: &str,
        server: &str,
    ) -> anyhow::Result<kube::Client> {
        crate::harness::install_crypto();
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_json(token, server)?)?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Writes a kubeconfig for `server` that trusts the apiserver's CA and sends `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str, server: &str) -> anyhow::Result<()> {
        let kc = self.kubeconfig_json(token, server)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(kc.as_bytes())?;
        Ok(())
    }

    fn kubeconfig_json(&self, token: &str, server: &str) -> anyhow::Result<String> {
        let kc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testbed", "cluster": {
                "server": server,
                "certificate-authority-data": STANDARD.encode(&self.ca_pem),
            }}],
            "users": [{"name": "testbed", "user": {"token": token}}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "testbed"}}],
            "current-context": "testbed",
        });
        Ok(serde_json::to_string_pretty(&kc)?)
    }

    /// Runs the real kubectl as admin; returns stdout, or an error with stderr.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        kubectl_with(&self.admin_kubeconfig(), args, stdin).await
    }

    /// `kubectl apply --server-side` of a manifest (YAML text), as admin.
    pub async fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=testbed",
                "-f",
                "-",
            ],
            Some(manifest),
        )
        .await
    }

    pub async fn create_namespace(&self, ns: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.admin_client().await?);
        let obj = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        api.patch(
            ns,
            &PatchParams::apply("testbed").force(),
            &Patch::Apply(&obj),
        )
        .await?;
        Ok(())
    }

    pub async fn apply_service_account(
        &self,
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> anyhow::Result<ServiceAccount> {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin_client().await?, ns);
        let obj = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(api
            .patch(
                name,
                &PatchParams::apply("testbed").force(),
                &Patch::Apply(&obj),
            )
            .await?)
    }

    /// The kubelet's part: a pod bound to `node`, then Running with `ips` (status subresource).
    pub async fn run_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        sa: &str,
        ips: &[&str],
    ) -> anyhow::Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.admin_client().await?, ns);
        // The pod as the emulated API would hold it; its status is the kubelet's, set below.
        let pod = Pod {
            status: None,
            ..crate::kube_api::pod(ns, name, node, sa, &[])
        };
        api.create(&PostParams::default(), &pod).await?;
        self.set_pod_ips(ns, name, ips).await
    }

    /// The kubelet's status update: `phase` Running and `status.podIP(s)` = `ips`.
    pub async fn set_pod_ips(&self, ns: &str, name: &str, ips: &[&str]) -> anyhow::Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.admin_client().await?, ns);
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": "10.0.0.1",
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        }});
        Ok(api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?)
    }

    /// The kubelet's final delete (grace period 0: the containers are gone).
    pub async fn delete_pod(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.admin_client().await?, ns);
        api.delete(name, &DeleteParams::default().grace_period(0))
            .await?;
        Ok(())
    }

    /// A TokenRequest as admin for `ns/sa` (`bound` to a pod `(name, uid)` if given).
    pub async fn mint_token(
        &self,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        expiration_secs: i64,
        bound: Option<(&str, &str)>,
    ) -> anyhow::Result<String> {
        mint_token_with(
            self.admin_client().await?,
            ns,
            sa,
            audiences,
            expiration_secs,
            bound,
        )
        .await
        .map_err(|e| anyhow!("{e}"))
    }

    /// The apiserver's TokenReview: `Some(username)` when it accepts `token` for `audiences`.
    pub async fn token_review(
        &self,
        token: &str,
        audiences: &[&str],
    ) -> anyhow::Result<Option<String>> {
        let api: Api<TokenReview> = Api::all(self.admin_client().await?);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..Default::default()
        };
        let out = api.create(&PostParams::default(), &review).await?;
        let status = out.status.unwrap_or_default();
        Ok(if status.authenticated == Some(true) {
            status.user.and_then(|u| u.username)
        } else {
            None
        })
    }

    /// etcd's current revision (its JSON gateway).
    pub async fn etcd_revision(&self) -> anyhow::Result<i64> {
        let v = http_post_json(
            &self.etcd_url,
            "/v3/kv/range",
            &json!({"key": STANDARD.encode("/")}),
        )
        .await?;
        v["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no revision in {v}"))
    }

    /// Compacts etcd up to its current revision: every older resourceVersion is gone (a watch
    /// resumed from one gets 410 Gone). Returns the revision compacted to.
    pub async fn compact_etcd(&self) -> anyhow::Result<i64> {
        let rev = self.etcd_revision().await?;
        http_post_json(
            &self.etcd_url,
            "/v3/kv/compaction",
            &json!({"revision": rev.to_string(), "physical": true}),
        )
        .await?;
        Ok(rev)
    }

    /// Every audit event so far (requests made by ServiceAccounts).
    pub fn audit_events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Ok(mut procs) = self.procs.lock() {
            // The apiserver first: etcd going away under it only makes it log.
            for p in procs.iter_mut().rev() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

/// A TokenRequest with `client`'s credentials (the error names what the apiserver said).
pub async fn mint_token_with(
    client: kube::Client,
    ns: &str,
    sa: &str,
    audiences: &[&str],
    expiration_secs: i64,
    bound: Option<(&str, &str)>,
) -> Result<String, kube::Error> {
    let api: Api<ServiceAccount> = Api::namespaced(client, ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(expiration_secs),
            bound_object_ref: bound.map(|(name, uid)| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    };
    let out = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await?;
    Ok(out.status.map(|s| s.token).unwrap_or_default())
}

/// Runs the real kubectl with `kubeconfig`; returns stdout, or an error with stderr.
pub async fn kubectl_with(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(bin_dir().join("kubectl"));
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap_or(Path::new("/tmp")))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt as _;
        pipe.write_all(text.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("kubectl timed out")??;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program args` under `setpriv --pdeathsig KILL`: it dies with the thread that spawned it
/// (see the module docs). In `netns`, through `ip netns exec`, which enters the namespace and
/// execs setpriv in the same process, so the death signal still ties it to that thread.
fn supervised(netns: Option<&str>, program: &Path, args: &[String]) -> Command {
    let mut cmd = match netns {
        None => Command::new("setpriv"),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            c
        }
    };
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns from one thread that lives until the process exits: `--pdeathsig` fires when the
/// spawning *thread* ends, and test threads end long before a shared control plane should.
fn spawn_outliving_test_threads(cmd: Command) -> anyhow::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let program = cmd.get_program().to_string_lossy().into_owned();
    tx.lock()
        .map_err(|_| anyhow!("spawner poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("spawner thread gone"))?;
    reply_rx
        .recv()
        .map_err(|_| anyhow!("spawner thread gone"))?
        .with_context(|| format!("starting {program}"))
}

/// Removes control plane folders left by test processes that no longer exist.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("irsa-cp-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

async fn read_when_complete(path: &Path) -> anyhow::Result<String> {
    // The apiserver writes the file once; wait until it holds both certificates it writes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches("END CERTIFICATE").count() >= 2 {
            return Ok(text);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{} incomplete", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Free loopback ports (bound, read, released; the servers bind them a moment later).
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = [0u16; N];
    for (o, l) in out.iter_mut().zip(&listeners) {
        *o = l.local_addr()?.port();
    }
    Ok(out)
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow!("no randomness"))?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One JSON POST over plain HTTP (etcd's gateway).
async fn http_post_json(base: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let addr: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("bad address {base}"))?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "POST {path}: {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    Ok(serde_json::from_slice(&bytes)?)
}

/// A listener on the machine's loopback whose every connection is made again, to the same port,
/// from inside a network namespace (see the module docs). Plain threads, not tasks: a shared
/// control plane outlives the runtime of the test that started it. Dropping it stops accepting
/// and closes every bridged connection.
struct Bridge {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Both ends of every bridged connection, to shut down on drop.
    open: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// The accepting thread, which owns the listener: joined on drop, so the port is closed
    /// when drop returns.
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Bridge {
    fn start(netns: &str) -> anyhow::Result<Bridge> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (ns, stop2, open2) = (netns.to_string(), stop.clone(), open.clone());
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let acceptor = std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = crate::netns::connect_in(&ns, target) else {
                    continue; // the client sees its connection closed
                };
                let (Ok(a), Ok(b)) = (inbound.try_clone(), outbound.try_clone()) else {
                    continue;
                };
                if let Ok(mut o) = open2.lock() {
                    o.retain(|s| s.peer_addr().is_ok());
                    o.extend([a, b]);
                }
                pipe(&inbound, &outbound);
                pipe(&outbound, &inbound);
            }
        });
        Ok(Bridge {
            port,
            stop,
            open,
            acceptor: Some(acceptor),
        })
    }
}

/// Copies `from` to `to` on a thread of its own; the end of `from` ends `to`'s writing side.
fn pipe(from: &std::net::TcpStream, to: &std::net::TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop` and drops the listener.
        if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && let Some(t) = self.acceptor.take()
        {
            let _ = t.join();
        }
        if let Ok(open) = self.open.lock() {
            for s in open.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
