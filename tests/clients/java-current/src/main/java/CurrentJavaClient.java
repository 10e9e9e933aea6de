// A pod's workload with a current AWS SDK for Java 2.x (IMDSv2 session tokens; the test sets
// AWS_EC2_METADATA_V1_DISABLED=true so only IMDSv2 can succeed). Finds credentials through
// DefaultCredentialsProvider (system properties, env, web identity, profile, container, then the
// instance-profile provider at 169.254.169.254), then asks STS who it is, with only the STS
// client pointed at the endpoint given as the first argument. Prints one JSON line; never a
// secret.

import java.net.URI;

import software.amazon.awssdk.auth.credentials.AwsCredentials;
import software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider;
import software.amazon.awssdk.core.useragent.BusinessMetricFeatureId;
import software.amazon.awssdk.core.util.VersionInfo;
import software.amazon.awssdk.regions.Region;
import software.amazon.awssdk.services.sts.StsClient;

public final class CurrentJavaClient {
    private static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : String.valueOf(s).toCharArray()) {
            if (c == '"' || c == '\\') {
                b.append('\\').append(c);
            } else if (c < 0x20) {
                b.append(String.format("\\u%04x", (int) c));
            } else {
                b.append(c);
            }
        }
        return b.append('"').toString();
    }

    private static void out(boolean ok, String... kv) {
        StringBuilder b = new StringBuilder("{\"ok\":").append(ok);
        for (int i = 0; i + 1 < kv.length; i += 2) {
            b.append(',').append(json(kv[i])).append(':').append(json(kv[i + 1]));
        }
        b.append(",\"sdk\":").append(json("aws-sdk-java-v2 " + VersionInfo.SDK_VERSION));
        System.out.println(b.append('}'));
    }

    public static void main(String[] args) {
        if (args.length != 1) {
            out(false, "error", "usage: CurrentJavaClient STS_ENDPOINT");
            System.exit(2);
        }
        try (DefaultCredentialsProvider chain = DefaultCredentialsProvider.builder().build()) {
            AwsCredentials creds;
            try {
                creds = chain.resolveCredentials();
            } catch (RuntimeException e) {
                out(false, "error", "no credentials: " + e.getMessage());
                return;
            }
            // The endpoint applies to the STS client alone; the chain above used the defaults.
            try (StsClient sts = StsClient.builder()
                    .region(Region.US_EAST_1)
                    .endpointOverride(URI.create(args[0]))
                    .credentialsProvider(chain)
                    .build()) {
                String arn = sts.getCallerIdentity().arn();
                String key = creds.accessKeyId();
                // Current SDKs name the provider by its user-agent feature id ("0" is IMDS).
                String id = creds.providerName().orElse("unknown");
                String method = id.equals(BusinessMetricFeatureId.CREDENTIALS_IMDS.value())
                        ? "InstanceProfileCredentialsProvider" : id;
                out(true, "arn", arn, "method", method,
                        "access_key_prefix", key.substring(0, Math.min(4, key.length())));
            }
        } catch (RuntimeException e) {
            out(false, "error", e.getClass().getSimpleName() + ": " + e.getMessage());
        }
    }
}
