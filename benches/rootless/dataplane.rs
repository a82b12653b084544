//! Phase 5, data plane: iperf3 between containers (the infra's bridge vs.
//! root's own) and from the host through a published port (each driver).

use crate::cleanup;
use crate::driver::{state_dir_path, Attached, Cx};
use crate::iperf::{
    client_args, container_server, in_container, iperf_client, iperf_server, IPERF_PORT,
};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::rounds::alternate;
use crate::stats::{gbits_runs, ratio_runs};
use crate::Res;
use lab::free_tcp_port;
use serde_json::{json, Value};
use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A bridge of root's own in throwaway namespaces: c1 and c2 on br0 in
/// a third namespace, as the infra has them, removed on drop.
/// Root's own bridge and two "containers": network namespaces held by
/// processes of ours, never named under /run/netns, so the benchmark
/// mounts nothing in the machine's mount namespace (a test running
/// beside it compares that namespace's mounts).
pub(crate) struct RootBridge {
    holders: Vec<Child>,
}

impl RootBridge {
    const C1_IP: &'static str = "10.199.0.1";

    fn create(mtu: u32) -> Res<RootBridge> {
        let mut me = RootBridge {
            holders: Vec::new(),
        };
        for _ in 0..3 {
            let holder = Command::new("unshare")
                .args(["--net", "sleep", "infinity"])
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("unshare --net: {e}"))?;
            cleanup::with(|l| l.pids.push(holder.id()));
            me.holders.push(holder);
        }
        // The holders' namespaces are theirs once unshare has exec'd sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        while me.holders.iter().any(|h| !is_sleep(h.id())) {
            if Instant::now() > deadline {
                return Err("the namespace holders did not start".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        let ip = |i: usize, args: &[&str]| -> Res<()> {
            let out = me
                .exec(i)
                .arg("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        let mtu = mtu.to_string();
        let br_pid = me.holders[0].id().to_string();
        ip(0, &["link", "add", "br0", "type", "bridge"])?;
        for (i, addr, port) in [(1, "10.199.0.1/24", "v1"), (2, "10.199.0.2/24", "v2")] {
            ip(
                i,
                &[
                    "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", port,
                    "mtu", &mtu, "netns", &br_pid,
                ],
            )?;
            ip(0, &["link", "set", port, "master", "br0", "up"])?;
            ip(i, &["addr", "add", addr, "dev", "eth0"])?;
            ip(i, &["link", "set", "eth0", "up"])?;
            ip(i, &["link", "set", "lo", "up"])?;
        }
        ip(0, &["link", "set", "br0", "up"])?;
        Ok(me)
    }

    /// A command in namespace `i` (0 the bridge's, 1 and 2 the
    /// containers'); the program and its arguments follow.
    fn exec(&self, i: usize) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", self.holders[i].id()))
            .arg("--");
        cmd
    }
}

pub(crate) fn is_sleep(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
}

impl Drop for RootBridge {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.holders.iter().map(Child::id).collect();
        for h in &mut self.holders {
            let _ = h.kill();
            let _ = h.wait();
        }
        cleanup::with(|l| l.pids.retain(|p| !pids.contains(p)));
    }
}

pub(crate) fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    // (measure, result, (target, met))
    type Line = (String, String, Option<(&'static str, bool)>);
    let mut rows: Vec<Line> = Vec::new();
    {
        let cx: &Cx = cx;
        let secs = cx.plan.iperf_secs;
        let rounds = cx.plan.iperf_rounds;
        let default = NetOpts::default();
        let conf = |o: &NetOpts, rc: Option<Value>| stdin_conf(&conflist(Chain::Full, o), rc);

        // container <-> container: the infra's bridge vs root's own.
        let s1 = Attached::add(cx, "bench-dp-s1", conf(&default, None))?;
        let s2 = Attached::add(cx, "bench-dp-s2", conf(&default, None))?;
        let root = RootBridge::create(65520)?;
        let _srv_infra = container_server(cx, &s1.c, "iperf3 server in a container")?;
        let mut root_srv = root.exec(1);
        root_srv.args([
            "iperf3",
            "-s",
            "-B",
            RootBridge::C1_IP,
            "-p",
            &IPERF_PORT.to_string(),
            "--forceflush",
        ]);
        let _srv_root = iperf_server(root_srv, "iperf3 server on root's bridge")?;
        let s1_ip = s1.ip()?;
        progress!("data plane: container → container, infra bridge vs root's bridge");
        let (infra_bw, root_bw) = alternate(
            rounds,
            || {
                iperf_client(
                    in_container(cx, &s2.c, &client_args(&s1_ip, IPERF_PORT, secs)),
                    "infra bridge client",
                )
            },
            || {
                let mut c = root.exec(2);
                c.args(client_args(RootBridge::C1_IP, IPERF_PORT, secs));
                iperf_client(c, "root bridge client")
            },
        )?;
        rows.push((
            "container → container over the infra bridge (MTU 65520)".into(),
            gbits_runs(&infra_bw),
            None,
        ));
        rows.push((
            "container → container over a root-owned bridge (MTU 65520)".into(),
            gbits_runs(&root_bw),
            None,
        ));
        let (r, text) = ratio_runs(&infra_bw, &root_bw);
        rows.push((
            "ratio infra bridge / root bridge".into(),
            text,
            Some(("≥ 0.9", r >= 0.9)),
        ));

        // container -> host through each way out: phase 6 (rootless/outbound.rs).

        // host -> container through a published port, each driver.
        let (hp_builtin, hp_slirp) = (free_tcp_port(), free_tcp_port());
        let mapping = |hp: u16| json!({ "portMappings": [{ "hostPort": hp, "containerPort": IPERF_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" }] });
        let pb = Attached::add(
            cx,
            "bench-dp-builtin",
            conf(&default, Some(mapping(hp_builtin))),
        )?;
        let slirp_opts = NetOpts {
            state_dir: Some(state_dir_path(cx, "bench-slirp-ports")),
            port_driver: Some("slirp4netns"),
            ..NetOpts::default()
        };
        let ps = Attached::add(
            cx,
            "bench-dp-slirp",
            conf(&slirp_opts, Some(mapping(hp_slirp))),
        )?;
        let _srv_pb = container_server(cx, &pb.c, "iperf3 server behind the builtin driver")?;
        let _srv_ps = container_server(cx, &ps.c, "iperf3 server behind the slirp4netns driver")?;
        progress!(
            "data plane: host → container through a published port, builtin vs slirp4netns driver"
        );
        let host_client = |hp: u16, what: &str| {
            let mut c = Command::new("iperf3");
            c.args(&client_args("127.0.0.1", hp, secs)[1..]);
            iperf_client(c, what)
        };
        let (bw_builtin, bw_slirp) = alternate(
            rounds,
            || host_client(hp_builtin, "builtin driver client"),
            || host_client(hp_slirp, "slirp4netns driver client"),
        )?;
        rows.push((
            "host → container through a published port, portDriver builtin".into(),
            gbits_runs(&bw_builtin),
            None,
        ));
        rows.push((
            "host → container through a published port, portDriver slirp4netns".into(),
            gbits_runs(&bw_slirp),
            None,
        ));
        let (r, text) = ratio_runs(&bw_builtin, &bw_slirp);
        rows.push((
            "ratio builtin / slirp4netns".into(),
            text,
            Some(("≥ 3×", r >= 3.0)),
        ));
        drop((pb, ps));
        drop((s1, s2, root));
    }
    for (measure, result, target) in rows {
        match target {
            Some((t, met)) => cx.report.target(section, measure, result, t, met),
            None => cx.report.fig(section, measure, result),
        }
    }
    Ok(())
}
