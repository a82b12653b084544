//! Phase 4, parallelism: concurrent ADDs vs. the same ADDs one after the other.

use crate::driver::{plugin, worker, Cx};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::stats::{floats, median, ms, ratio};
use crate::Res;
use lab::Container;
use serde_json::json;

pub(crate) fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let full = conflist(Chain::Full, &NetOpts::default());
    let conf = stdin_conf(&full, None);
    let keeper = cx.lab.container();
    plugin(cx, "ADD", "bench-par-keeper", &keeper, &conf)?;
    let n = cx.plan.par_n;
    let containers: Vec<Container> = (0..n).map(|_| cx.lab.container()).collect();
    let out = worker(
        cx,
        json!({
            "task": "parallel", "rounds": cx.plan.par_rounds,
            "bin": cx.bin, "cni_path": cx.lab.cni_path(), "conf": conf,
            "netns": containers.iter().map(Container::netns).collect::<Vec<_>>(),
        }),
    );
    let del = plugin(cx, "DEL", "bench-par-keeper", &keeper, &conf);
    for c in containers.iter().chain([&keeper]) {
        cx.lab.kill_container(c);
    }
    let out = out?;
    del?;
    let (par, seq) = (median(&floats(&out["par"])), median(&floats(&out["seq"])));
    let rounds = cx.plan.par_rounds;
    let r = &mut cx.report;
    r.fig(
        section,
        format!("{n} sequential ADDs, wall (median of {rounds})"),
        format!("{} ({} each)", ms(seq), ms(seq / n as f64)),
    );
    r.fig(section, format!("{n} concurrent ADDs, wall"), ms(par));
    r.fig(
        section,
        "speed-up sequential / concurrent",
        ratio(seq / par),
    );
    Ok(())
}
