//! The irsa-imds test bed: an emulated Kubernetes API, STS emulators (moto and an in-process one),
//! a fake upstream IMDS, network-namespace topology, the in-process agent harness, and the demo.

pub mod cni_socket;
pub mod controlplane;
pub mod deps;
pub mod fake_imds;
pub mod harness;
pub mod jwt;
pub mod kube_api;
pub mod moto;
pub mod netns;
pub mod sts;
pub mod util;
