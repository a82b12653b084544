//! (b) and (c) of the ports phase: iperf3 throughput beside rootlesskit and
//! pasta, and short connections per second.

use super::client::{self};
use super::peers::{pasta_iperf, peer_lab, rootlesskit_iperf};
use super::{Line, Plan};
use crate::cleanup;
use crate::iperf::{client_args, iperf_client};
use crate::rounds::alternate_n;
use crate::stats::{gbits, gbits_runs, median, ratio_runs};
use crate::Res;
use lab::free_tcp_port;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;

/// (c): short connections per second, 1 and 8 at a time, rounds rotating
/// the order of builtin, slirp4netns and direct.
pub(super) fn per_second(
    p: &Plan,
    builtin: SocketAddr,
    slirp: SocketAddr,
    direct: SocketAddr,
) -> Res<Vec<Line>> {
    let who = [
        ("builtin", builtin),
        ("slirp4netns", slirp),
        ("host loopback directly", direct),
    ];
    let mut rows = Vec::new();
    for conc in [1usize, 8] {
        let runs = alternate_n(p.cps_rounds, who.len(), |i| {
            let (what, addr) = who[i];
            let out = client::short(addr, conc, p.cps_secs)
                .map_err(|e| format!("{what}: client: {e}"))?;
            // The slirp4netns driver drops connections (see (d)); ours and
            // the direct one must not.
            if what != "slirp4netns" && out.failures() > 0 {
                return Err(format!(
                    "{what}: {} short connections failed: {}; first: {}",
                    out.failures(),
                    out.failed_text(),
                    out.first_failure.unwrap_or_default()
                ));
            }
            Ok(out.ok as f64 / out.wall.as_secs_f64())
        })?;
        let text = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.0}/s (runs {lo:.0}–{hi:.0})", median(v))
        };
        rows.push((
            format!("(c) short connections, {conc} at a time: builtin / slirp4netns / host loopback directly"),
            format!(
                "{} / {} / {}",
                text(&runs[0]),
                text(&runs[1]),
                text(&runs[2])
            ),
            None,
        ));
        rows.push((
            format!("(c) ratio builtin / direct, builtin / slirp4netns ({conc} at a time)"),
            format!(
                "{} / {}",
                ratio_runs(&runs[0], &runs[2]).1,
                ratio_runs(&runs[0], &runs[1]).1
            ),
            None,
        ));
    }
    Ok(rows)
}

/// (b): iperf3 host → server behind a published port, 1 and 8 streams,
/// our two drivers, rootlesskit's builtin port driver and pasta, rounds
/// rotating the order.
pub(super) fn throughput(p: &Plan, b_port: u16, s_port: u16) -> Res<(Vec<Line>, String)> {
    let (rk_port, pa_port) = (free_tcp_port(), free_tcp_port());
    let (rk_lab, pa_lab) = (peer_lab("bench-rootlesskit")?, peer_lab("bench-pasta")?);
    let rk = rootlesskit_iperf(&rk_lab, rk_port)?;
    let pa = pasta_iperf(&pa_lab, pa_port)?;
    let who = [
        ("rootless-cni builtin", b_port),
        ("rootless-cni slirp4netns", s_port),
        ("rootlesskit builtin", rk_port),
        ("pasta -t", pa_port),
    ];
    let mut rows: Vec<Line> = Vec::new();
    let mut md = String::from(
        "### 7. Published ports: iperf3 host → a server behind a published port (Gbit/s, median (runs))\n\n\
         | | 1 stream | 8 streams |\n|---|---|---|\n",
    );
    let mut by: Vec<[Vec<f64>; 2]> = Vec::new();
    for (k, streams) in [1u32, 8].into_iter().enumerate() {
        let runs = alternate_n(p.iperf_rounds, who.len(), |i| {
            let (what, port) = who[i];
            let mut args = client_args("127.0.0.1", port, p.iperf_secs);
            if streams > 1 {
                args.extend(["-P".to_string(), streams.to_string()]);
            }
            let mut c = Command::new("iperf3");
            c.args(&args[1..]);
            iperf_client(c, &format!("{what}, {streams} stream(s)"))
        })?;
        for (i, r) in runs.into_iter().enumerate() {
            if by.len() <= i {
                by.push([Vec::new(), Vec::new()]);
            }
            by[i][k] = r;
        }
    }
    for (i, (what, _)) in who.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {what} | {} | {} |",
            gbits_runs(&by[i][0]),
            gbits_runs(&by[i][1])
        );
    }
    for (k, streams) in ["1 stream", "8 streams"].iter().enumerate() {
        rows.push((
            format!("(b) iperf3 host → container, {streams}: builtin / slirp4netns / rootlesskit builtin / pasta -t"),
            by.iter()
                .map(|b| gbits(median(&b[k])))
                .collect::<Vec<_>>()
                .join(" / "),
            None,
        ));
        for (j, target) in [(1, 3.0), (2, 1.0), (3, 1.0)] {
            let (r, text) = ratio_runs(&by[0][k], &by[j][k]);
            rows.push((
                format!("(b) ratio builtin / {} ({streams})", who[j].0),
                text,
                Some((format!("≥ {target}×"), r >= target)),
            ));
        }
    }
    drop((rk, pa));
    for lab in [rk_lab, pa_lab] {
        let uid = lab.uid;
        drop(lab);
        cleanup::with(|l| l.more_uids.retain(|u| *u != uid));
    }
    Ok((rows, md))
}
