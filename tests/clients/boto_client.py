"""A pod's workload with botocore: run by the legacy venv (botocore 1.12.199, the last release
before web identity, IMDSv1 only) or by the current one (IMDSv2; the test sets
AWS_EC2_METADATA_V1_DISABLED=true so only IMDSv2 can succeed). Finds credentials through the
SDK's default chain (which ends at 169.254.169.254), then asks STS who it is. Prints one JSON
line; never a secret."""
import json
import sys

import botocore
import botocore.session


def main():
    sts_endpoint = sys.argv[1]
    session = botocore.session.get_session()
    creds = session.get_credentials()
    if creds is None:
        print(json.dumps({"ok": False, "error": "no credentials", "sdk": botocore.__version__}))
        return
    client = session.create_client("sts", region_name="us-east-1", endpoint_url=sts_endpoint)
    arn = client.get_caller_identity()["Arn"]
    print(json.dumps({"ok": True, "arn": arn, "method": creds.method,
                      "access_key_prefix": creds.access_key[:4], "sdk": botocore.__version__}))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, do not crash: the test reads the line
        print(json.dumps({"ok": False, "error": "%s: %s" % (type(e).__name__, e)}))
