// A pod's workload with the AWS SDK for Java 1.11.600 (before web identity; IMDSv1 only).
// Finds credentials through DefaultAWSCredentialsProviderChain (env, system properties,
// profile, then the container/instance-profile provider at 169.254.169.254), then asks STS who it
// is, with only the STS client pointed at the endpoint given as the first argument. Prints one
// JSON line; never a secret.

import com.amazonaws.auth.AWSCredentials;
import com.amazonaws.auth.AWSCredentialsProvider;
import com.amazonaws.auth.AWSCredentialsProviderChain;
import com.amazonaws.auth.DefaultAWSCredentialsProviderChain;
import com.amazonaws.client.builder.AwsClientBuilder.EndpointConfiguration;
import com.amazonaws.services.securitytoken.AWSSecurityTokenService;
import com.amazonaws.services.securitytoken.AWSSecurityTokenServiceClientBuilder;
import com.amazonaws.services.securitytoken.model.GetCallerIdentityRequest;
import com.amazonaws.util.VersionInfoUtils;

public final class LegacyJavaClient {
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
        b.append(",\"sdk\":").append(json("aws-java-sdk " + VersionInfoUtils.getVersion()));
        System.out.println(b.append('}'));
    }

    /** The chain's provider that answered (the chain keeps it to reuse). */
    private static String lastUsed(AWSCredentialsProviderChain chain) {
        try {
            java.lang.reflect.Field f = AWSCredentialsProviderChain.class.getDeclaredField("lastUsedProvider");
            f.setAccessible(true);
            Object p = f.get(chain);
            return p == null ? "unknown" : p.getClass().getSimpleName();
        } catch (ReflectiveOperationException | RuntimeException e) {
            return "unknown";
        }
    }

    public static void main(String[] args) {
        if (args.length != 1) {
            out(false, "error", "usage: LegacyJavaClient STS_ENDPOINT");
            System.exit(2);
        }
        try {
            DefaultAWSCredentialsProviderChain chain = DefaultAWSCredentialsProviderChain.getInstance();
            AWSCredentials creds;
            try {
                creds = chain.getCredentials();
            } catch (RuntimeException e) {
                out(false, "error", "no credentials: " + e.getMessage());
                return;
            }
            // The endpoint applies to the STS client alone; the chain above used the defaults.
            AWSSecurityTokenService sts = AWSSecurityTokenServiceClientBuilder.standard()
                    .withEndpointConfiguration(new EndpointConfiguration(args[0], "us-east-1"))
                    .withCredentials((AWSCredentialsProvider) chain)
                    .build();
            String arn = sts.getCallerIdentity(new GetCallerIdentityRequest()).getArn();
            String key = creds.getAWSAccessKeyId();
            out(true, "arn", arn, "method", lastUsed(chain),
                    "access_key_prefix", key.substring(0, Math.min(4, key.length())));
        } catch (RuntimeException e) {
            out(false, "error", e.getClass().getSimpleName() + ": " + e.getMessage());
        }
    }
}
