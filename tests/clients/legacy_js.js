// A pod's workload with aws-sdk for JavaScript 2.400.0 (before web identity; IMDSv1 only).
// Resolves credentials through the SDK's default chain (which ends at 169.254.169.254), then
// asks STS who it is. Prints one JSON line; never a secret.
const AWS = require('aws-sdk');

function out(o) { process.stdout.write(JSON.stringify(o) + '\n'); }

const endpoint = process.argv[2];
AWS.config.getCredentials(function (err) {
  if (err || !AWS.config.credentials || !AWS.config.credentials.accessKeyId) {
    out({ ok: false, error: String((err && (err.code || err.message)) || 'no credentials'), sdk: AWS.VERSION });
    return;
  }
  const creds = AWS.config.credentials;
  const sts = new AWS.STS({ region: 'us-east-1', endpoint: endpoint, credentials: creds });
  sts.getCallerIdentity({}, function (e, data) {
    if (e) { out({ ok: false, error: String(e.code || e.message) }); return; }
    out({ ok: true, arn: data.Arn, method: creds.constructor.name,
          access_key_prefix: creds.accessKeyId.slice(0, 4), sdk: AWS.VERSION });
  });
});
