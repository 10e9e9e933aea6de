//! The real network path for end-to-end tests: a "node" network namespace and "pod" namespaces
//! joined by veth pairs, routed like the EKS VPC CNI does it (a /32 per pod, a link-local
//! gateway answered by proxy ARP). Everything happens inside namespaces this module creates and
//! removes, even when a test fails: the machine's own namespace and netfilter are never touched.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

/// Every external command gets this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
const PREFIX: &str = "irsatb";
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Fails with a clear message unless this process can create network namespaces.
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the network-namespace suites need root (CI runs them as root): rerun as root");
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("`ip` (iproute2) is missing")?;
    anyhow::ensure!(
        out.status.success(),
        "`ip netns` does not work here: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs a command to completion under [`COMMAND_TIMEOUT`]; fails with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let mut child = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {args:?}"))?;
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("{args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Topology {
    node: String,
    pods: Vec<String>,
}

impl Topology {
    /// One node namespace and `pods` pod namespaces, dual stack. Pod i has 10.77.0.(10+i)/32 and
    /// fd00:77::(10+i)/128 on eth0; the node has 10.77.255.1 and fd00:77::ffff on lo and a veth
    /// `vethirsa<i>` per pod.
    pub fn new(pods: usize) -> anyhow::Result<Topology> {
        require_root()?;
        anyhow::ensure!(pods <= 200, "at most 200 pods");
        cleanup_stale();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut t = Topology {
            node: format!("{id}-node"),
            pods: Vec::new(),
        };
        // From here on, Drop removes whatever was made, even if a later step fails.
        sh(&["ip", "netns", "add", &t.node])?;
        let n = t.node.clone();
        sh(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &n, "addr", "add", "10.77.255.1/32", "dev", "lo"])?;
        // The pods' link-local gateway (Calico and the VPC CNI use one): a node address, so the
        // node answers ARP for it on every veth.
        sh(&["ip", "-n", &n, "addr", "add", "169.254.1.1/32", "dev", "lo"])?;
        sysctl(&n, "net.ipv4.ip_forward=1")?;
        sysctl(&n, "net.ipv4.conf.all.rp_filter=0")?;
        sysctl(&n, "net.ipv4.conf.default.rp_filter=0")?;
        // Dual stack: the node's IPv6 address, the DNAT target for [fd00:ec2::254]:80.
        let node6 = format!("{}/128", t.node_ip6());
        sh(&["ip", "-n", &n, "addr", "add", &node6, "dev", "lo"])?;
        for i in 0..pods {
            let p = format!("{id}-pod{i}");
            sh(&["ip", "netns", "add", &p])?;
            t.pods.push(p.clone());
            let veth = format!("vethirsa{i}");
            let ip = t.pod_ip(i).to_string();
            // Created inside the node namespace, its peer moved straight into the pod's.
            sh(&[
                "ip", "-n", &n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &p,
            ])?;
            sh(&["ip", "-n", &n, "link", "set", &veth, "up"])?;
            sysctl(&n, &format!("net.ipv4.conf.{veth}.proxy_arp=1"))?;
            sysctl(&n, &format!("net.ipv4.conf.{veth}.rp_filter=0"))?;
            sh(&[
                "ip",
                "-n",
                &n,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &veth,
            ])?;
            sh(&["ip", "-n", &p, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "-n",
                &p,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &p, "link", "set", "eth0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &p,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            sh(&[
                "ip",
                "-n",
                &p,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            // IPv6: a /128 per pod, the node side of the veth as the pod's link-local gateway.
            let ip6 = format!("{}/128", t.pod_ip6(i));
            sh(&[
                "ip",
                "-n",
                &n,
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &veth,
                "nodad",
            ])?;
            sh(&["ip", "-n", &n, "-6", "route", "add", &ip6, "dev", &veth])?;
            sh(&["ip", "-n", &p, "addr", "add", &ip6, "dev", "eth0", "nodad"])?;
            sh(&[
                "ip", "-n", &p, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])?;
        }
        Ok(t)
    }

    pub fn node_ns(&self) -> &str {
        &self.node
    }

    pub fn pod_ns(&self, i: usize) -> &str {
        &self.pods[i]
    }

    pub fn pod_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 10 + i as u8)
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 255, 1)
    }

    pub fn pod_ip6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 10 + i as u16)
    }

    pub fn node_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0xffff)
    }

    pub fn host_interface_pattern(&self) -> String {
        "vethirsa+".into()
    }

    /// A listener bound inside the node namespace: the socket keeps its namespace, so in-process
    /// emulators serve from there.
    pub fn bind_in_node(&self, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
        in_netns(&self.node, move || {
            std::net::TcpListener::bind(addr).map_err(Into::into)
        })
    }

    /// A TCP connection made from inside `ns`.
    pub fn connect_in(&self, ns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
        connect_in(ns, addr)
    }

    /// A command run inside `ns` (`ip netns exec`), killed if the test drops it.
    pub fn exec_in(&self, ns: &str, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", ns, program]).kill_on_drop(true);
        c
    }

    /// `iptables -t nat -S` inside the node namespace.
    pub fn node_nat_rules(&self) -> anyhow::Result<String> {
        sh(&[
            "ip", "netns", "exec", &self.node, "iptables", "-w", "5", "-t", "nat", "-S",
        ])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// A TCP connection made from inside namespace `ns` (for threads that do not hold the
/// [`Topology`]); the error keeps the `io::Error` so callers can tell a refusal.
pub fn connect_in(ns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
    in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(Into::into)
    })
}

/// Sets a sysctl inside namespace `ns`.
fn sysctl(ns: &str, setting: &str) -> anyhow::Result<()> {
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", setting]).map(|_| ())
}

/// Runs `f` on a short-lived thread that has entered `ns`; the calling thread is untouched.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Removes namespaces left by test-bed processes that no longer exist (a crashed earlier run).
fn cleanup_stale() {
    let Ok(list) = sh(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}
