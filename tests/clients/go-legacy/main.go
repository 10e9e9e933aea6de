// A pod's workload with the AWS SDK for Go v1 at v1.23.0 (before web identity, which came in
// v1.23.13; IMDSv1 only). Finds credentials through the default session's chain (env, shared
// files, then the EC2 role provider at 169.254.169.254), then asks STS who it is, with only the
// STS client pointed at the endpoint given as the first argument. Prints one JSON line; never a
// secret.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/sts"
)

const sdk = "aws-sdk-go " + aws.SDKVersion

func out(v map[string]interface{}) {
	v["sdk"] = sdk
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func main() {
	if len(os.Args) != 2 {
		out(map[string]interface{}{"ok": false, "error": "usage: go-legacy-client STS_ENDPOINT"})
		os.Exit(2)
	}
	sess, err := session.NewSession()
	if err != nil {
		out(map[string]interface{}{"ok": false, "error": "session: " + err.Error()})
		return
	}
	creds, err := sess.Config.Credentials.Get()
	if err != nil {
		out(map[string]interface{}{"ok": false, "error": "no credentials: " + err.Error()})
		return
	}
	// The endpoint and region apply to the STS client alone; the credential chain above used
	// the SDK's defaults.
	client := sts.New(sess, &aws.Config{
		Endpoint: aws.String(os.Args[1]),
		Region:   aws.String("us-east-1"),
	})
	id, err := client.GetCallerIdentity(&sts.GetCallerIdentityInput{})
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
		"arn":               aws.StringValue(id.Arn),
		"method":            creds.ProviderName,
		"access_key_prefix": prefix,
	})
}
