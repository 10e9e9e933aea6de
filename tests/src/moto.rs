//! The real third-party STS emulator, moto, as a child process.

use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

pub struct Moto {
    endpoint: String,
    port: u16,
    child: Child,
}

impl Moto {
    /// Starts moto on 127.0.0.1 and a free port, and waits until it answers.
    pub async fn start() -> anyhow::Result<Moto> {
        Self::start_with(&[], "127.0.0.1").await
    }

    /// Starts moto inside network namespace `ns` (the test's node), on all its addresses.
    pub async fn start_in_netns(ns: &str) -> anyhow::Result<Moto> {
        Self::start_with(&["ip", "netns", "exec", ns], "0.0.0.0").await
    }

    /// Starts moto behind `prefix` (e.g. `["ip", "netns", "exec", "node"]`), listening on `host`.
    pub async fn start_with(prefix: &[&str], host: &str) -> anyhow::Result<Moto> {
        let python = crate::deps::require(&crate::deps::moto_python())?;
        // A free port: bind, read, release. Moto rebinds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut argv: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        argv.push(python.display().to_string());
        argv.extend(["-m", "moto.server", "-H", host, "-p"].map(String::from));
        argv.push(port.to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting moto: {argv:?}"))?;
        let endpoint = format!("http://{host}:{port}");
        let moto = Moto {
            endpoint,
            port,
            child,
        };
        let probe: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if moto.answers(&probe, host, port).await {
                return Ok(moto);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "moto did not answer on {host}:{port} within 60s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self, prefix: &[String], host: &str, port: u16) -> bool {
        if prefix.is_empty() {
            return tokio::net::TcpStream::connect((host, port)).await.is_ok();
        }
        // Inside a namespace: probe from there.
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..])
            .args(["bash", "-c", &format!("exec 3<>/dev/tcp/{host}/{port}")]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        matches!(tokio::time::timeout(Duration::from_secs(5), cmd.status()).await, Ok(Ok(s)) if s.success())
    }

    /// The ARN moto reports for GetCallerIdentity signed with served credentials (`AccessKeyId`,
    /// `SecretAccessKey`, `Token` of an IMDS answer), or the error code it refuses them with.
    pub async fn caller_arn(&self, v: &serde_json::Value) -> Result<String, String> {
        let field = |k: &str| v[k].as_str().ok_or(format!("no {k} in the answer"));
        let creds = aws_credential_types::Credentials::new(
            field("AccessKeyId")?,
            field("SecretAccessKey")?,
            v["Token"].as_str().map(String::from),
            None,
            "irsa-imds-test",
        );
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(creds)
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_sts::Client::from_conf(conf)
            .get_caller_identity()
            .send()
            .await
            .map(|out| out.arn.unwrap_or_default())
            .map_err(|e| {
                aws_sdk_sts::error::ProvideErrorMetadata::code(&e)
                    .unwrap_or("no error code")
                    .to_string()
            })
    }

    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Turns moto's IAM authentication on (`INITIAL_NO_AUTH_ACTION_COUNT` = 0 through its
    /// `/moto-api/reset-auth` endpoint): from now on every request must be SigV4-signed with a key
    /// moto knows, the secret that goes with it and, for STS session keys, the session token that
    /// goes with them (`InvalidClientTokenId` / `SignatureDoesNotMatch` otherwise). Every action is
    /// checked, unsigned `AssumeRoleWithWebIdentity` included, so call this after the credentials
    /// under test were issued. Only for a moto reachable from this network namespace.
    pub async fn require_auth(&self) -> anyhow::Result<()> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::post("/moto-api/reset-auth")
            .header("host", format!("127.0.0.1:{}", self.port))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"0")))?;
        let resp = tx.send_request(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "moto reset-auth: {}",
            resp.status()
        );
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// An STS client for moto (dummy credentials: moto accepts any).
    pub async fn sts_client(&self) -> aws_sdk_sts::Client {
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(self.endpoint.clone())
            .credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .build();
        aws_sdk_sts::Client::from_conf(conf)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
