//! Tests whose URLs the service fetches run where nothing but loopback exists: a typo in
//! a URL (`0127.0.0.1` is 87.0.0.1, a public address) or a regression in the SSRF guard
//! then cannot send traffic off this machine.
//!
//! `make test` runs the whole suite in such a network namespace (scripts/test.sh). A test
//! run any other way (`cargo test --test ssrf`) re-runs itself in one: `unshare -n`
//! (root), `ip link set lo up`, then this test binary with just the calling test.

use std::process::Command;

/// Set in the re-run test's environment: it must find itself isolated, not re-run again.
const CHILD: &str = "SEARCH_IMG_TEST_NETNS_CHILD";

/// Whether the calling test should run its body here: true inside a loopback-only
/// network namespace. Otherwise runs the calling test in a fresh one, asserts that it
/// passed there, and returns false.
pub fn loopback_only() -> bool {
    if only_loopback() {
        return true;
    }
    assert!(
        std::env::var_os(CHILD).is_none(),
        "`unshare -n` gave a network namespace with interfaces other than lo"
    );
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .expect("the test's thread carries its name (run without --test-threads=1)")
        .to_string();
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("unshare")
        .args([
            "-n",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(&exe)
        .env(CHILD, "1")
        .args([test.as_str(), "--exact", "--nocapture"])
        .status()
        .expect("`unshare` runs this test in a network namespace of its own (needs root)");
    assert!(
        status.success(),
        "{test} failed in its own network namespace ({status}); see its output above"
    );
    false
}

/// Whether this process's network namespace has no interface but `lo`.
/// (`/sys/class/net` shows the namespace sysfs was mounted in, not this one.)
pub fn only_loopback() -> bool {
    let Ok(dev) = std::fs::read_to_string("/proc/self/net/dev") else {
        return false;
    };
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .all(|name| name.trim() == "lo")
}
