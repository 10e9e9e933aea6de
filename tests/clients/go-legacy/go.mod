module irsa-imds/testbed/go-legacy-client

go 1.22

require github.com/aws/aws-sdk-go v1.23.0

require github.com/jmespath/go-jmespath v0.0.0-20180206201540-c2b33e8439af // indirect
