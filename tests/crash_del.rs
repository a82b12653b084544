//! The plugin SIGKILLed at random points of DEL (alone, with its process
//! group, or with the inner plugin it runs): the next calls recover, no
//! lock stays held, no record is half-written, a witness attachment keeps
//! its infra and passes CHECK, and nothing of ours is left (or taken) after
//! the last DEL. The loop is `lab::crash::crash_loop`.

use lab::crash::{crash_loop, iterations};

#[test]
fn sigkill_during_del_then_recover() {
    crash_loop(lab::binary!(), "crash_del", "DEL", iterations(), 0xDE1_2024);
}
