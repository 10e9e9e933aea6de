//! Response bodies in the exact shapes EC2 sends and SDKs parse.

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde::Serialize;

/// `YYYY-MM-DDTHH:MM:SSZ`: no fractions (some SDKs' parsers reject them).
pub(crate) fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    dt.format(&f)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsBody<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
}

/// The body of `iam/security-credentials/<role>` on success, field order as EC2's.
pub(crate) fn credentials(
    access_key_id: &str,
    secret: &str,
    token: &str,
    expiration: SystemTime,
    updated: SystemTime,
) -> String {
    pretty(&CredentialsBody {
        code: "Success",
        last_updated: timestamp(updated),
        kind: "AWS-HMAC",
        access_key_id,
        secret_access_key: secret,
        token,
        expiration: timestamp(expiration),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct FailureBody<'a> {
    code: &'static str,
    message: &'a str,
    last_updated: String,
}

/// What EC2 answers when it cannot assume the instance profile's role: 200 with a failure code and
/// no keys, so SDKs report "no credentials" instead of retrying forever.
pub(crate) fn assume_role_failure(message: &str, updated: SystemTime) -> String {
    pretty(&FailureBody {
        code: "AssumeRoleUnauthorizedAccess",
        message,
        last_updated: timestamp(updated),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct InfoBody {
    code: &'static str,
    last_updated: String,
    instance_profile_arn: String,
    instance_profile_id: String,
}

/// The pod's view of `iam/info`: an instance profile named after its role.
pub(crate) fn info(role_arn: &str, updated: SystemTime) -> String {
    let (prefix, name) = role_arn.split_once(":role/").unwrap_or((role_arn, ""));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, role_arn.as_bytes());
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let id: String = digest
        .as_ref()
        .iter()
        .take(17)
        .map(|b| ALPHABET[(*b as usize) % 32] as char)
        .collect();
    pretty(&InfoBody {
        code: "Success",
        last_updated: timestamp(updated),
        instance_profile_arn: format!("{prefix}:instance-profile/{name}"),
        instance_profile_id: format!("AIPA{id}"),
    })
}

fn pretty<T: Serialize>(v: &T) -> String {
    // Serialising a struct of strings cannot fail.
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The small HTML page EC2 returns with error statuses.
pub(crate) fn error_page(status: StatusCode) -> String {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n <head>\n  <title>{code} - {reason}</title>\n </head>\n <body>\n  <h1>{code} - {reason}</h1>\n </body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(731)
    }

    #[test]
    fn timestamps_have_no_fractions() {
        assert_eq!(timestamp(t(1_795_000_000)), "2026-11-18T11:06:40Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn credentials_have_exactly_the_ec2_fields() {
        let body = credentials(
            "ASIAX",
            "sec\"ret",
            "tok",
            t(1_795_003_600),
            t(1_795_000_000),
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let obj = v.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        let mut expected = vec![
            "AccessKeyId",
            "Code",
            "Expiration",
            "LastUpdated",
            "SecretAccessKey",
            "Token",
            "Type",
        ];
        let mut got = keys.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        assert_eq!(v["Code"], "Success");
        assert_eq!(v["Type"], "AWS-HMAC");
        assert_eq!(v["SecretAccessKey"], "sec\"ret");
        assert_eq!(v["Expiration"], "2026-11-18T12:06:40Z");
        assert!(
            body.starts_with("{\n  \"Code\": \"Success\",\n  \"LastUpdated\""),
            "{body}"
        );
    }

    #[test]
    fn failure_carries_no_keys() {
        let v: serde_json::Value =
            serde_json::from_str(&assume_role_failure("denied", t(0))).unwrap();
        assert_eq!(v["Code"], "AssumeRoleUnauthorizedAccess");
        assert!(v.get("AccessKeyId").is_none() && v.get("Token").is_none());
    }

    #[test]
    fn info_names_an_instance_profile_after_the_role() {
        let v: serde_json::Value =
            serde_json::from_str(&info("arn:aws:iam::123456789012:role/team/app", t(0))).unwrap();
        assert_eq!(
            v["InstanceProfileArn"],
            "arn:aws:iam::123456789012:instance-profile/team/app"
        );
        let id = v["InstanceProfileId"].as_str().unwrap();
        assert!(id.starts_with("AIPA") && id.len() == 21, "{id}");
    }
}
