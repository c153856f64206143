//! Process-level faults for the failover tests: signals to a PID the test
//! started (SIGKILL, SIGSTOP/SIGCONT) and a look at a thread's scheduler
//! state, by which a test aims a fault at a moment of the VMM's epoch
//! (a vCPU thread that spins guest code is running, `R`, except while the
//! VMM parks it for a checkpoint's pause).
//!
//! Only ever pass PIDs of children the test spawned itself.

use std::io;

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("PID out of range"))?;
    // SAFETY: kill(2) has no memory effects; the caller names its own child.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops `pid` (SIGSTOP): it neither runs nor answers until [`resume`].
pub fn freeze(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGSTOP)
}

/// Lets a [`freeze`]d `pid` run again (SIGCONT).
pub fn resume(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGCONT)
}

/// The thread ID of `pid`'s thread named `name` (its `comm`), if any.
pub fn thread_named(pid: u32, name: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for e in dir.flatten() {
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            return Some(tid);
        }
    }
    None
}

/// A thread's scheduler state letter (`R` running, `S` sleeping, `D`,
/// `T` stopped, ...) from `/proc/PID/task/TID/stat`; `None` once it is
/// gone.
pub fn thread_state(pid: u32, tid: u32) -> Option<u8> {
    let stat = std::fs::read(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // "tid (comm) S ...": the comm may contain spaces and parentheses.
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn stop_continue_and_thread_states() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let tid = thread_named(pid, "sh").expect("the shell's thread");
        assert_eq!(tid, pid);
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_state(pid, tid) != Some(b'R') && Instant::now() < deadline {}
        assert_eq!(thread_state(pid, tid), Some(b'R'), "a spinning thread runs");
        freeze(pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_state(pid, tid) != Some(b'T') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(thread_state(pid, tid), Some(b'T'), "stopped");
        resume(pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_state(pid, tid) == Some(b'T') && Instant::now() < deadline {}
        assert_ne!(thread_state(pid, tid), Some(b'T'), "continued");
        assert!(thread_named(pid, "no-such-thread").is_none());
        signal(pid, libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(thread_state(pid, tid).is_none(), "reaped");
    }
}
