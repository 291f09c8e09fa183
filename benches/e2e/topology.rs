//! Where the `wan` case's processes run: two network namespaces joined by a veth pair when
//! the bench runs as root and `ip netns` works, or loopback otherwise.
//!
//! The namespaces are `hw-wan-a-PID` (the serving side, 10.213.0.1/30 on its end of the
//! pair) and `hw-wan-b-PID` (the client side: the relay and the puller, 10.213.0.2/30), each
//! with `lo` up. They are deleted when the [`Topology`] is dropped, also after a failure;
//! deleting a namespace deletes its end of the pair and with it the pair.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use crate::Result;

/// The serving side's address in the namespace topology.
const SERVER_IP: &str = "10.213.0.1";
/// The client side's address.
const CLIENT_IP: &str = "10.213.0.2";
/// The prefix length of the pair's private network.
const PREFIX: u8 = 30;

/// Which side of the link a process runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The node that is pulled from.
    Server,
    /// The puller, and the relay in front of it.
    Client,
}

/// Two namespaces joined by a veth pair, deleted on drop.
#[derive(Debug)]
pub struct Namespaces {
    server: String,
    client: String,
    /// How many of the two exist (the first, or both): what drop deletes.
    created: usize,
}

impl Namespaces {
    fn create() -> Result<Namespaces> {
        let pid = std::process::id();
        let mut ns = Namespaces {
            server: format!("hw-wan-a-{pid}"),
            client: format!("hw-wan-b-{pid}"),
            created: 0,
        };
        ip(&["netns", "add", &ns.server])?;
        ns.created = 1;
        ip(&["netns", "add", &ns.client])?;
        ns.created = 2;
        let (a, b) = ("hw-wan-va", "hw-wan-vb");
        ip(&[
            "link", "add", a, "netns", &ns.server, "type", "veth", "peer", "name", b, "netns",
            &ns.client,
        ])?;
        for (name, dev, addr) in [(&ns.server, a, SERVER_IP), (&ns.client, b, CLIENT_IP)] {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/{PREFIX}"),
                "dev",
                dev,
            ])?;
            ip(&["-n", name, "link", "set", dev, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            // `exec` needs more than `add` (a mount namespace of its own): probe it here, so
            // a container that allows the one and not the other falls back to loopback.
            ip(&["netns", "exec", name, "true"])?;
        }
        Ok(ns)
    }

    fn name(&self, side: Side) -> &str {
        match side {
            Side::Server => &self.server,
            Side::Client => &self.client,
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in [&self.server, &self.client].into_iter().take(self.created) {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("e2e: could not delete network namespace {name}: {e}");
            }
        }
    }
}

/// Runs `ip` with `args`; an error if it cannot run or fails.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// The topology of one `wan` case.
#[derive(Debug)]
pub enum Topology {
    /// Two namespaces joined by a veth pair.
    Namespaces(Namespaces),
    /// Everything on this machine's loopback, and why the namespaces were not used.
    Loopback(String),
}

impl Topology {
    /// The namespaces if this process is root and they can be made, loopback otherwise.
    pub fn set_up() -> Topology {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Topology::Loopback("not root".to_owned());
        }
        match Namespaces::create() {
            Ok(ns) => Topology::Namespaces(ns),
            // The partly made namespaces were deleted when `create` dropped them.
            Err(e) => Topology::Loopback(format!("ip netns failed: {e}")),
        }
    }

    /// The address the serving side listens on.
    pub fn server_ip(&self) -> &'static str {
        match self {
            Topology::Namespaces(_) => SERVER_IP,
            Topology::Loopback(_) => "127.0.0.1",
        }
    }

    /// How the report names the topology.
    pub fn describe(&self) -> String {
        match self {
            Topology::Namespaces(_) => "two netns joined by veth".to_owned(),
            Topology::Loopback(why) => format!("loopback ({why})"),
        }
    }

    /// A command that runs this bench binary with `args` on `side`.
    ///
    /// # Errors
    /// The path of this binary cannot be read.
    pub fn bench(&self, side: Side, args: &[&OsStr]) -> Result<Command> {
        let exe = std::env::current_exe()?;
        let mut cmd = match self {
            Topology::Namespaces(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name(side)]).arg(exe);
                c
            }
            Topology::Loopback(_) => Command::new(exe),
        };
        cmd.arg(crate::child::ROLE_FLAG).args(args);
        Ok(cmd)
    }
}
