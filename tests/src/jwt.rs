//! ServiceAccount token signing and verification as Kubernetes and STS do them: RS256 JWTs signed
//! by an issuer key ([`Issuer`], used by the emulated API server), verified against a JSON Web Key
//! Set ([`Jwks`]) that comes either from an emulated issuer or from an OIDC issuer's discovery
//! document fetched over HTTP(S) ([`KeySource`]).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, anyhow, bail, ensure};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::{Value, json};

/// The issuer every emulated API server uses unless told otherwise (an EKS-style OIDC URL).
pub const TESTBED_ISSUER: &str = "https://oidc.eks.us-east-1.amazonaws.com/id/TESTBED";

/// A token issuer: an issuer URL and an RSA-2048 signing key generated at random for this process
/// (or for this issuer, with [`Issuer::generate`]).
pub struct Issuer {
    url: String,
    kid: String,
    key: aws_lc_rs::rsa::KeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("url", &self.url)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// A new issuer with a fresh random key.
    pub fn generate(url: &str) -> anyhow::Result<Issuer> {
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| anyhow!("RSA key generation failed"))?;
        let der = key.public_key().as_ref().to_vec();
        let (n, e) = rsa_public_key_components(&der)?;
        // As the API server does: the key id is a hash of the public key.
        let kid =
            URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
        Ok(Issuer {
            url: url.into(),
            kid,
            key,
            n,
            e,
        })
    }

    /// The process-wide issuer behind [`TESTBED_ISSUER`]: every emulated API server started with
    /// [`KubeApi::start`](crate::kube_api::KubeApi::start) signs with it, and an STS emulator
    /// started with [`StsEmulator::start`](crate::sts::StsEmulator::start) trusts it.
    pub fn testbed() -> Arc<Issuer> {
        static ISSUER: OnceLock<Arc<Issuer>> = OnceLock::new();
        ISSUER
            .get_or_init(|| Arc::new(Issuer::generate(TESTBED_ISSUER).expect("RSA key generation")))
            .clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// An RS256 JWT carrying `claims`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({"alg": "RS256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| anyhow!("RS256 signing failed"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// The public key as a JWK Set (what `/openid/v1/jwks` serves).
    pub fn jwks_json(&self) -> Value {
        json!({"keys": [{
            "use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(&self.n), "e": URL_SAFE_NO_PAD.encode(&self.e),
        }]})
    }

    /// The OIDC discovery document (what `/.well-known/openid-configuration` serves).
    pub fn discovery_json(&self, jwks_uri: &str) -> Value {
        json!({
            "issuer": self.url,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }

    pub fn jwks(&self) -> Jwks {
        Jwks::parse(&self.jwks_json()).unwrap_or_default()
    }
}

/// Splits a DER `RSAPublicKey` (RFC 8017: SEQUENCE { n INTEGER, e INTEGER }) into n and e.
fn rsa_public_key_components(der: &[u8]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    fn tlv(b: &[u8], tag: u8) -> anyhow::Result<(&[u8], &[u8])> {
        ensure!(b.len() >= 2 && b[0] == tag, "DER: expected tag {tag:#x}");
        let (len, hdr) = match b[1] {
            l if l < 0x80 => (usize::from(l), 2),
            0x81 => (usize::from(*b.get(2).context("DER: short")?), 3),
            0x82 => (
                usize::from(*b.get(2).context("DER: short")?) << 8
                    | usize::from(*b.get(3).context("DER: short")?),
                4,
            ),
            _ => bail!("DER: unsupported length"),
        };
        let body = b.get(hdr..hdr + len).context("DER: truncated")?;
        Ok((body, &b[hdr + len..]))
    }
    let strip = |i: &[u8]| {
        let z = i.iter().take_while(|b| **b == 0).count();
        i[z..].to_vec()
    };
    let (seq, _) = tlv(der, 0x30)?;
    let (n, rest) = tlv(seq, 0x02)?;
    let (e, _) = tlv(rest, 0x02)?;
    Ok((strip(n), strip(e)))
}

/// One verification key of a JWK Set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Jwk {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    EcP256 { point: Vec<u8> },
}

/// The verification keys of a JWK Set, by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    keys: BTreeMap<String, Jwk>,
}

impl Jwks {
    /// Reads a JWK Set (`{"keys": [...]}`); keys of other types are skipped.
    pub fn parse(v: &Value) -> anyhow::Result<Jwks> {
        let b64 = |k: &Value, f: &str| -> anyhow::Result<Vec<u8>> {
            URL_SAFE_NO_PAD
                .decode(k[f].as_str().with_context(|| format!("JWK without {f}"))?)
                .with_context(|| format!("JWK {f} is not base64url"))
        };
        let mut keys = BTreeMap::new();
        for k in v["keys"].as_array().context("JWK Set without keys")? {
            let kid = k["kid"].as_str().unwrap_or_default().to_string();
            let key = match (k["kty"].as_str(), k["crv"].as_str()) {
                (Some("RSA"), _) => Jwk::Rsa {
                    n: b64(k, "n")?,
                    e: b64(k, "e")?,
                },
                (Some("EC"), Some("P-256")) => {
                    let mut point = vec![4];
                    point.extend(b64(k, "x")?);
                    point.extend(b64(k, "y")?);
                    Jwk::EcP256 { point }
                }
                _ => continue,
            };
            keys.insert(kid, key);
        }
        Ok(Jwks { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Verifies the signature of a compact JWS against the key its header names and returns the
    /// claims. Only RS256 and ES256 are accepted (never `none`, never HMAC).
    pub fn verify(&self, token: &str) -> Result<Value, String> {
        let (header, claims) = decode_unverified(token)?;
        let (input, sig) = token
            .rsplit_once('.')
            .ok_or_else(|| "not a JWT".to_string())?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| "signature is not base64url".to_string())?;
        let kid = header["kid"].as_str().unwrap_or_default();
        let key = self
            .keys
            .get(kid)
            .or_else(|| {
                (self.keys.len() == 1 && kid.is_empty())
                    .then(|| self.keys.values().next())
                    .flatten()
            })
            .ok_or_else(|| format!("no key with id {kid:?}"))?;
        let ok = match (header["alg"].as_str(), key) {
            (Some("RS256"), Jwk::Rsa { n, e }) => {
                aws_lc_rs::signature::RsaPublicKeyComponents { n, e }
                    .verify(
                        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                        input.as_bytes(),
                        &sig,
                    )
                    .is_ok()
            }
            (Some("ES256"), Jwk::EcP256 { point }) => aws_lc_rs::signature::UnparsedPublicKey::new(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
                point,
            )
            .verify(input.as_bytes(), &sig)
            .is_ok(),
            (alg, _) => return Err(format!("algorithm {alg:?} does not match the key")),
        };
        if ok {
            Ok(claims)
        } else {
            Err("signature verification failed".into())
        }
    }
}

/// The header and claims of a JWT, signature not checked.
pub fn decode_unverified(token: &str) -> Result<(Value, Value), String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (header.payload.signature)".into());
    };
    let part = |p: &str| -> Result<Value, String> {
        let b = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "JWT part is not base64url".to_string())?;
        serde_json::from_slice(&b).map_err(|_| "JWT part is not JSON".to_string())
    };
    let (h, c) = (part(h)?, part(c)?);
    if !h.is_object() || !c.is_object() {
        return Err("JWT header and claims must be objects".into());
    }
    Ok((h, c))
}

/// Where a verifier gets its issuer URL and keys.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// An emulated issuer in this process (e.g. [`KubeApi::issuer`](crate::kube_api::KubeApi::issuer)).
    Emulated(Arc<Issuer>),
    /// An OIDC issuer: `{issuer_url}/.well-known/openid-configuration` names the `jwks_uri`, both
    /// fetched over HTTP(S) when a token names a key not seen yet (as STS does). `ca_pem` is the
    /// PEM bundle to trust for https (none: no https); `bearer_token` is sent if the issuer wants
    /// authentication (a kube-apiserver without anonymous access to the discovery endpoints).
    Oidc {
        issuer_url: String,
        ca_pem: Option<String>,
        bearer_token: Option<String>,
    },
}

impl KeySource {
    pub fn oidc(issuer_url: &str, ca_pem: Option<&str>) -> KeySource {
        KeySource::Oidc {
            issuer_url: issuer_url.into(),
            ca_pem: ca_pem.map(String::from),
            bearer_token: None,
        }
    }

    /// The `iss` tokens must carry.
    pub fn issuer(&self) -> &str {
        match self {
            KeySource::Emulated(i) => i.url(),
            KeySource::Oidc { issuer_url, .. } => issuer_url,
        }
    }

    /// The current key set (fetched for OIDC).
    pub async fn fetch(&self) -> anyhow::Result<Jwks> {
        match self {
            KeySource::Emulated(i) => Ok(i.jwks()),
            KeySource::Oidc {
                issuer_url,
                ca_pem,
                bearer_token,
            } => {
                let base = issuer_url.trim_end_matches('/');
                let disc = get_json(
                    &format!("{base}/.well-known/openid-configuration"),
                    ca_pem.as_deref(),
                    bearer_token.as_deref(),
                )
                .await
                .context("OIDC discovery document")?;
                ensure!(
                    disc["issuer"].as_str() == Some(issuer_url.as_str()),
                    "discovery document names issuer {} instead of {issuer_url}",
                    disc["issuer"]
                );
                let jwks_uri = disc["jwks_uri"]
                    .as_str()
                    .context("discovery document without jwks_uri")?;
                let set = get_json(jwks_uri, ca_pem.as_deref(), bearer_token.as_deref())
                    .await
                    .context("JWK Set")?;
                Jwks::parse(&set)
            }
        }
    }
}

/// GET `url` and parse the JSON answer (http, or https trusting only `ca_pem`).
pub async fn get_json(
    url: &str,
    ca_pem: Option<&str>,
    bearer: Option<&str>,
) -> anyhow::Result<Value> {
    crate::harness::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots
                .add(cert.context("CA PEM")?)
                .context("CA certificate")?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(https);
    // A real kube-apiserver serves the JWK Set as application/jwk-set+json and answers 406 to a
    // client that accepts only application/json.
    let mut req =
        http::Request::get(url).header("accept", "application/json, application/jwk-set+json");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.request(req.body(Empty::new())?),
    )
    .await
    .with_context(|| format!("GET {url}: timed out"))?
    .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| anyhow!("GET {url}: {e}"))?
        .to_bytes();
    ensure!(status.is_success(), "GET {url}: {status}");
    serde_json::from_slice(&body).with_context(|| format!("GET {url}: not JSON"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() {
        let a = Issuer::generate("https://a").unwrap();
        let b = Issuer::generate("https://b").unwrap();
        let t = a.sign(&json!({"sub": "x"})).unwrap();
        assert_eq!(a.jwks().verify(&t).unwrap()["sub"], "x");
        assert!(b.jwks().verify(&t).is_err(), "another issuer's key");
        let (input, sig) = t.rsplit_once('.').unwrap();
        let (h, _) = input.split_once('.').unwrap();
        let forged = format!("{h}.{}.{sig}", URL_SAFE_NO_PAD.encode(r#"{"sub":"y"}"#));
        assert!(a.jwks().verify(&forged).is_err(), "claims changed");
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, a.kid())),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"x"}"#)
        );
        assert!(a.jwks().verify(&none).is_err(), "alg none");
        assert!(a.jwks().verify("garbage").is_err());
    }
}
