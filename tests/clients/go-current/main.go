// A pod's workload with a current AWS SDK for Go v2 (IMDSv2 session tokens; the test sets
// AWS_EC2_METADATA_V1_DISABLED=true so only IMDSv2 can succeed). Finds credentials through
// the default config's chain (env, shared files, web identity, ECS, then the EC2 role provider
// at 169.254.169.254), then asks STS who it is, with only the STS client pointed at the endpoint
// given as the first argument. Prints one JSON line; never a secret.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

const sdk = "aws-sdk-go-v2 " + aws.SDKVersion

func out(v map[string]interface{}) {
	v["sdk"] = sdk
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func main() {
	if len(os.Args) != 2 {
		out(map[string]interface{}{"ok": false, "error": "usage: go-current-client STS_ENDPOINT"})
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"))
	if err != nil {
		out(map[string]interface{}{"ok": false, "error": "config: " + err.Error()})
		return
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		out(map[string]interface{}{"ok": false, "error": "no credentials: " + err.Error()})
		return
	}
	// The endpoint applies to the STS client alone; the credential chain above used the SDK's
	// defaults.
	endpoint := os.Args[1]
	client := sts.NewFromConfig(cfg, func(o *sts.Options) { o.BaseEndpoint = &endpoint })
	id, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		out(map[string]interface{}{"ok": false, "error": "GetCallerIdentity: " + err.Error()})
		return
	}
	prefix := creds.AccessKeyID
	if len(prefix) > 4 {
		prefix = prefix[:4]
	}
	out(map[string]interface{}{
		"ok":                true,
		"arn":               aws.ToString(id.Arn),
		"method":            creds.Source,
		"access_key_prefix": prefix,
	})
}
