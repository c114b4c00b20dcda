//! Running the command: its own process group, signals passed on, and the
//! group terminated if the lock is lost while it runs.

use std::ffi::OsString;
use std::process::ExitStatus;
use std::time::Duration;

use lockbroker::LockGuard;
use tokio::process::{Child, Command};

use crate::exit;

/// How the command ended.
pub enum Outcome {
    /// It exited by itself (or by a signal we passed on).
    Exited(ExitStatus),
    /// The lock was lost and the command was terminated.
    LockLost,
}

/// Spawns `command` with `env`, in its own process group when `own_group`.
pub fn spawn(
    command: &[OsString],
    env: &[(&str, String)],
    remove: &[&str],
    own_group: bool,
) -> Result<Child, (u8, String)> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in remove {
        cmd.env_remove(k);
    }
    #[cfg(unix)]
    if own_group {
        cmd.process_group(0);
    }
    #[cfg(not(unix))]
    let _ = own_group;
    cmd.spawn().map_err(|e| {
        // As shells do: 127 for a missing command, 126 for one that cannot run.
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => 127,
            _ => 126,
        };
        (
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    })
}

/// What a command runs as, signalled as a whole: its process group (Unix)
/// or its Job Object (Windows).
pub trait Tree {
    /// Passes `sig` on to every process of the tree.
    fn signal(&self, sig: Signal);
}

/// A process group (Unix), named by its leader's pid.
#[cfg(unix)]
pub struct Group(pub u32);

#[cfg(unix)]
impl Tree for Group {
    fn signal(&self, sig: Signal) {
        signal_group(self.0, sig);
    }
}

/// Waits for the command (`exited` completes with its status) while holding
/// `guard`: SIGINT and SIGTERM (Ctrl-C and Ctrl-Break on Windows) are
/// passed on to its `tree`; losing the lock terminates the tree (SIGTERM,
/// or a Ctrl-Break, then after `grace` SIGKILL, or the job terminated);
/// someone waiting behind the hold sends the tree `on_contended`, once.
pub async fn supervise(
    exited: impl std::future::Future<Output = std::io::Result<ExitStatus>>,
    tree: &impl Tree,
    guard: &LockGuard,
    grace: Duration,
    on_contended: Option<Signal>,
) -> std::io::Result<Outcome> {
    let signals = Signals::new()?;
    let mut lost = false;
    let mut told = on_contended.is_none();
    let kill_at = tokio::time::sleep(Duration::MAX);
    tokio::pin!(kill_at);
    tokio::pin!(signals);
    tokio::pin!(exited);
    loop {
        tokio::select! {
            status = &mut exited => {
                let status = status?;
                return Ok(if lost { Outcome::LockLost } else { Outcome::Exited(status) });
            }
            sig = signals.as_mut().recv() => {
                if let Some(sig) = sig {
                    tree.signal(sig);
                }
            }
            () = guard.lost(), if !lost => {
                lost = true;
                let why = guard
                    .revocation()
                    .unwrap_or_else(|| "the daemon went away".into());
                eprintln!(
                    "lockbroker: lost the lock {:?} ({why}); terminating the command",
                    guard.name()
                );
                tree.signal(Signal::Term);
                kill_at.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            () = guard.contended(), if !told => {
                told = true;
                if let Some(sig) = on_contended {
                    tree.signal(sig);
                }
            }
            () = &mut kill_at, if lost => {
                tree.signal(Signal::Kill);
                kill_at.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(86400));
            }
        }
    }
}

/// Waits for `child`, passing SIGTERM on to it (SIGINT from a terminal
/// reaches it directly, as it shares our process group).
pub async fn wait_passing_term(mut child: Child) -> std::io::Result<ExitStatus> {
    let signals = Signals::new()?;
    tokio::pin!(signals);
    loop {
        tokio::select! {
            status = child.wait() => return status,
            sig = signals.as_mut().recv() => {
                if let (Some(Signal::Term), Some(pid)) = (sig, child.id()) {
                    signal_pid(pid, Signal::Term);
                }
            }
        }
    }
}

/// The exit status lockbroker passes on for `status`: the code, or 128 +
/// the signal that killed the command, as shells report it.
pub fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return code as u8;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128u8.wrapping_add(sig as u8);
        }
    }
    exit::ERROR
}

/// Signals lockbroker handles (on Windows: Ctrl-C, Ctrl-Break, and
/// terminating the job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT; Ctrl-C.
    Int,
    /// SIGTERM; Ctrl-Break.
    Term,
    /// SIGKILL; terminating every process of the job (only sent, never received).
    Kill,
    /// Another signal by number (only sent, by `--on-contended`).
    #[cfg(unix)]
    Other(i32),
}

/// The signals `--on-contended` may name (Unix), by name without `SIG`.
#[cfg(unix)]
const SIGNALS: [(&str, i32); 9] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("ALRM", libc::SIGALRM),
    ("CONT", libc::SIGCONT),
    ("WINCH", libc::SIGWINCH),
];

impl Signal {
    /// `USR1`, `SIGUSR1`, `usr1` or a number (Unix); on Windows `INT` or
    /// `TERM`, sent to the command's console group as a Ctrl-Break.
    pub fn parse(text: &str) -> Result<Signal, String> {
        let upper = text.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        #[cfg(unix)]
        {
            if let Some((_, number)) = SIGNALS.iter().find(|(n, _)| *n == name) {
                return Ok(Signal::Other(*number));
            }
            match name.parse::<i32>() {
                Ok(n) if (1..=64).contains(&n) && n != libc::SIGKILL && n != libc::SIGSTOP => {
                    Ok(Signal::Other(n))
                }
                _ => Err(format!(
                    "{text:?} is not a signal to send: one of {} (with or without SIG), or a number from 1 to 64 other than KILL and STOP",
                    SIGNALS.map(|(n, _)| n).join(", ")
                )),
            }
        }
        #[cfg(windows)]
        match name {
            "INT" => Ok(Signal::Int),
            "TERM" | "BREAK" => Ok(Signal::Term),
            _ => Err(format!(
                "{text:?} is not a signal a Windows command can get: INT or TERM (both a Ctrl-Break)"
            )),
        }
    }
}

#[cfg(unix)]
fn raw(sig: Signal) -> i32 {
    match sig {
        Signal::Int => libc::SIGINT,
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Other(n) => n,
    }
}

#[cfg(unix)]
fn signal_group(pgid: u32, sig: Signal) {
    // SAFETY: sending a signal to the process group we created.
    unsafe { libc::kill(-(pgid as i32), raw(sig)) };
}

#[cfg(unix)]
fn signal_pid(pid: u32, sig: Signal) {
    // SAFETY: sending a signal to our child.
    unsafe { libc::kill(pid as i32, raw(sig)) };
}

#[cfg(not(unix))]
fn signal_pid(_pid: u32, _sig: Signal) {}

/// SIGINT and SIGTERM (Ctrl-C and Ctrl-Break on Windows) as a stream;
/// installing it stops them from killing lockbroker itself.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(windows)]
    int: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    term: tokio::signal::windows::CtrlBreak,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(windows)]
        Ok(Signals {
            int: tokio::signal::windows::ctrl_c()?,
            term: tokio::signal::windows::ctrl_break()?,
        })
    }

    async fn recv(self: std::pin::Pin<&mut Self>) -> Option<Signal> {
        let this = self.get_mut();
        tokio::select! {
            s = this.int.recv() => s.map(|()| Signal::Int),
            s = this.term.recv() => s.map(|()| Signal::Term),
        }
    }
}

/// A command that runs holding a lock, on Unix: it inherits the lock's
/// connection, so the daemon sees the session end only when lockbroker
/// *and* every process that inherited the connection have closed it — a
/// `kill -9` of lockbroker leaves the lock with the command's tree, as a
/// `flock(1)` lock lives in the descriptor its command inherits.
#[cfg(unix)]
pub mod holding {
    use std::ffi::OsString;
    use std::os::fd::RawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, ExitStatus};

    use tokio::signal::unix::{SignalKind, signal};

    /// A started command and what watches it.
    pub struct Holding {
        pid: u32,
        children: tokio::signal::unix::Signal,
    }

    /// Spawns `command` in its own process group, inheriting `fd` (the
    /// lock's connection). lockbroker becomes a child subreaper first, so
    /// that whatever the command leaves running is re-parented to it and
    /// can be found when the command exits.
    pub fn spawn(
        command: &[OsString],
        env: &[(&str, String)],
        remove: &[&str],
        fd: RawFd,
    ) -> Result<Holding, (u8, String)> {
        // Before the spawn, so no exit is missed.
        let children = signal(SignalKind::child())
            .map_err(|e| (crate::exit::ERROR, format!("cannot watch the command: {e}")))?;
        #[cfg(target_os = "linux")]
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let (program, args) = command.split_first().expect("clap requires a command");
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on
        // the connection in the child only.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            };
            (
                code,
                format!("cannot run {}: {e}", program.to_string_lossy()),
            )
        })?;
        Ok(Holding {
            pid: child.id(),
            children,
        })
    }

    impl Holding {
        /// The command's pid, which is also its process group.
        pub fn pid(&self) -> u32 {
            self.pid
        }

        /// Waits for the command to exit. Every child that ends is reaped
        /// here (the command, and orphans re-parented to lockbroker).
        pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
            loop {
                if let Some(status) = reap(self.pid) {
                    return Ok(status);
                }
                self.children.recv().await;
            }
        }
    }

    /// Reaps every child that has ended; the command's status if it did.
    fn reap(command: u32) -> Option<ExitStatus> {
        let mut found = None;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own children with a local status.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return found;
            }
            if pid as u32 == command {
                found = Some(ExitStatus::from_raw(status));
            }
        }
    }

    /// Whether a process the command started still runs, other than
    /// `ignore` (the daemon lockbroker may have started itself). As a
    /// subreaper, lockbroker is the parent of every orphan of the command's
    /// tree, so a live descendant means a live child. `None` where that
    /// cannot be told (no subreaper, no `/proc`).
    pub fn descendants_remain(ignore: Option<u32>) -> Option<bool> {
        if !cfg!(target_os = "linux") {
            return None;
        }
        reap(0);
        let me = std::process::id();
        let dir = std::fs::read_dir("/proc").ok()?;
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if Some(pid) == ignore {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(me) && state != Some("Z") {
                return Some(true);
            }
        }
        Some(false)
    }

    /// Ends the connection for every process that shares it: after `-o`,
    /// what the command left running keeps no session open.
    pub fn shut_down(fd: RawFd) {
        // SAFETY: shutdown on our own connection's descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// A command that runs holding a lock, on Windows: the counterpart of the
/// Unix module of the same name. The command holds a copy of the lock's
/// pipe handle, so the daemon sees the session end only when lockbroker *and*
/// the command have closed it — a `taskkill /F` of lockbroker leaves the
/// lock with the command. The copy is not inheritable: Windows cannot
/// keep a handle from a daemon the command's tree starts (there is no
/// `pre_exec`), and such a daemon would hold the lock for its whole life.
/// The command starts suspended in a Job Object of its own (with its own
/// console process group) and is resumed once inside, so that none of its
/// descendants escapes the job unless it breaks away on purpose: the job is
/// how the whole tree is terminated when the lock is lost.
#[cfg(windows)]
pub mod holding {
    use std::ffi::OsString;
    use std::os::windows::io::RawHandle;
    use std::process::ExitStatus;

    use windows_sys::Win32::Foundation::{
        CloseHandle, DUPLICATE_SAME_ACCESS, DuplicateHandle, HANDLE, INVALID_HANDLE_VALUE,
    };
    use windows_sys::Win32::System::Console::{CTRL_BREAK_EVENT, GenerateConsoleCtrlEvent};
    use windows_sys::Win32::System::Diagnostics::ToolHelp::{
        CreateToolhelp32Snapshot, TH32CS_SNAPTHREAD, THREADENTRY32, Thread32First, Thread32Next,
    };
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JOB_OBJECT_LIMIT_BREAKAWAY_OK,
        JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
        JobObjectBasicProcessIdList, JobObjectExtendedLimitInformation, QueryInformationJobObject,
        SetInformationJobObject,
    };
    use windows_sys::Win32::System::Threading::{
        CREATE_NEW_PROCESS_GROUP, CREATE_SUSPENDED, GetCurrentProcess, OpenProcess, OpenThread,
        PROCESS_TERMINATE, ResumeThread, THREAD_SUSPEND_RESUME, TerminateProcess,
    };

    use super::{Signal, Tree};

    /// The status a command terminated with its job exits with: as a
    /// `taskkill /F` leaves it.
    const TERMINATED: u32 = 1;

    /// A started command, its job, and what watches it.
    pub struct Holding {
        child: tokio::process::Child,
        job: Job,
        /// The command's pid, which also names its console process group.
        pid: u32,
    }

    /// A Job Object handle, closed on drop. Once the command runs, closing
    /// it does not end the processes in the job: the lock stays with them.
    struct Job(HANDLE);

    // SAFETY: a kernel handle, usable from any thread.
    unsafe impl Send for Job {}
    // SAFETY: as above; the calls made on it are thread-safe.
    unsafe impl Sync for Job {}

    impl Drop for Job {
        fn drop(&mut self) {
            // SAFETY: the handle this value owns.
            unsafe { CloseHandle(self.0) };
        }
    }

    fn last_error(what: &str) -> (u8, String) {
        (
            crate::exit::ERROR,
            format!("{what}: {}", std::io::Error::last_os_error()),
        )
    }

    /// Sets the job's limits: processes may break away on purpose (a
    /// daemon the command autostarts must not die with it), and, while
    /// `kill_on_close`, the job's processes end with its last handle.
    fn set_limits(job: &Job, kill_on_close: bool) -> Result<(), (u8, String)> {
        let kill = if kill_on_close {
            JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        } else {
            0
        };
        // SAFETY: a zeroed limit structure is valid; it is passed by size.
        unsafe {
            let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
            limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_BREAKAWAY_OK | kill;
            if SetInformationJobObject(
                job.0,
                JobObjectExtendedLimitInformation,
                (&raw const limits).cast(),
                std::mem::size_of_val(&limits) as u32,
            ) == 0
            {
                return Err(last_error("cannot configure the command's job"));
            }
        }
        Ok(())
    }

    /// A new job, killing its processes (lockbroker's own included) if
    /// lockbroker dies before the command holds the lock's handle and runs
    /// (see [`spawn`]).
    fn new_job() -> Result<Job, (u8, String)> {
        // SAFETY: a plain call; no name, default security.
        let job = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if job.is_null() {
            return Err(last_error("cannot create a job for the command"));
        }
        let job = Job(job);
        set_limits(&job, true)?;
        Ok(job)
    }

    /// Gives the suspended process `process` a copy of `handle` (the lock's
    /// pipe): from then on the session lasts as long as the command's tree
    /// holds it.
    fn hand_over(handle: RawHandle, process: HANDLE) -> Result<(), (u8, String)> {
        let mut copy: HANDLE = std::ptr::null_mut();
        // SAFETY: both process handles are valid; the copy is the child's
        // (never closed here: it is the child's to keep).
        let ok = unsafe {
            DuplicateHandle(
                GetCurrentProcess(),
                handle as HANDLE,
                process,
                &mut copy,
                0,
                0,
                DUPLICATE_SAME_ACCESS,
            )
        };
        if ok == 0 {
            return Err(last_error("cannot hand the lock to the command"));
        }
        Ok(())
    }

    /// Resumes every thread of the suspended process `pid` (its first).
    fn resume(pid: u32) -> Result<(), (u8, String)> {
        // SAFETY: a snapshot handle closed below; entries sized as the API
        // requires.
        unsafe {
            let snapshot = CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0);
            if snapshot == INVALID_HANDLE_VALUE {
                return Err(last_error("cannot list the command's threads"));
            }
            let mut entry: THREADENTRY32 = std::mem::zeroed();
            entry.dwSize = std::mem::size_of::<THREADENTRY32>() as u32;
            let mut resumed = 0;
            let mut more = Thread32First(snapshot, &mut entry) != 0;
            while more {
                if entry.th32OwnerProcessID == pid {
                    let thread = OpenThread(THREAD_SUSPEND_RESUME, 0, entry.th32ThreadID);
                    if !thread.is_null() {
                        if ResumeThread(thread) != u32::MAX {
                            resumed += 1;
                        }
                        CloseHandle(thread);
                    }
                }
                more = Thread32Next(snapshot, &mut entry) != 0;
            }
            CloseHandle(snapshot);
            if resumed == 0 {
                return Err(last_error("cannot resume the command"));
            }
        }
        Ok(())
    }

    /// Spawns `command` suspended, in a job and a console process group of
    /// its own; gives it the lock's pipe `handle`; then resumes it.
    ///
    /// If lockbroker dies on the way, the lock is never left with a
    /// command that cannot run, nor a command left suspended: lockbroker
    /// joins the job first, so the command is born in it, and the job
    /// kills its processes with lockbroker's death (kill-on-close) until
    /// the command holds the handle and runs; then kill-on-close is
    /// cleared, and the lock stays with the command's tree. (Windows can
    /// put a new process in a job only after it exists, or by an attribute
    /// std does not offer; joining first closes that gap.)
    pub fn spawn(
        command: &[OsString],
        env: &[(&str, String)],
        remove: &[&str],
        handle: RawHandle,
    ) -> Result<Holding, (u8, String)> {
        let job = new_job()?;
        // SAFETY: our own process into our job.
        if unsafe { AssignProcessToJobObject(job.0, GetCurrentProcess()) } == 0 {
            let failure = last_error("cannot make a job for the command");
            // Not killed with the job's handle when it is dropped.
            let _ = set_limits(&job, false);
            return Err(failure);
        }
        let (program, args) = command.split_first().expect("clap requires a command");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .creation_flags(CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = set_limits(&job, false);
                let code = match e.kind() {
                    std::io::ErrorKind::NotFound => 127,
                    _ => 126,
                };
                return Err((
                    code,
                    format!("cannot run {}: {e}", program.to_string_lossy()),
                ));
            }
        };
        let pid = child.id().expect("a child not yet waited for");
        let process = child.raw_handle().expect("a child not yet waited for") as HANDLE;
        let started = hand_over(handle, process)
            .and_then(|()| resume(pid))
            .and_then(|()| set_limits(&job, false));
        if let Err(failure) = started {
            terminate_others(&job);
            let _ = set_limits(&job, false);
            return Err(failure);
        }
        Ok(Holding { child, job, pid })
    }

    /// Terminates every process of `job` but lockbroker, until none is
    /// left (what they start meanwhile is born in the job too).
    fn terminate_others(job: &Job) {
        let me = std::process::id();
        for _ in 0..64 {
            let pids = job_processes(job);
            let others: Vec<usize> = pids.into_iter().filter(|&p| p != me as usize).collect();
            if others.is_empty() {
                return;
            }
            for pid in others {
                // SAFETY: a handle opened and closed here.
                unsafe {
                    let process = OpenProcess(PROCESS_TERMINATE, 0, pid as u32);
                    if !process.is_null() {
                        TerminateProcess(process, TERMINATED);
                        CloseHandle(process);
                    }
                }
            }
        }
    }

    /// The pids of `job`'s processes (at most 4096).
    fn job_processes(job: &Job) -> Vec<usize> {
        const MAX: usize = 4096;
        // The list's header (two u32s) and then pids (usize each), in a
        // buffer aligned for both.
        let mut buf = vec![0usize; 1 + MAX];
        // SAFETY: a query into `buf`, by its size.
        let ok = unsafe {
            QueryInformationJobObject(
                job.0,
                JobObjectBasicProcessIdList,
                buf.as_mut_ptr().cast(),
                (buf.len() * std::mem::size_of::<usize>()) as u32,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Vec::new();
        }
        // SAFETY: the header's second u32 is the count written.
        let listed = unsafe { *buf.as_ptr().cast::<u32>().add(1) } as usize;
        buf[1..1 + listed.min(MAX)].to_vec()
    }

    impl Holding {
        /// The command's exit, and its tree for
        /// [`supervise`](super::supervise), to be awaited together.
        pub fn split(
            &mut self,
        ) -> (
            impl std::future::Future<Output = std::io::Result<ExitStatus>> + '_,
            JobTree<'_>,
        ) {
            let tree = JobTree {
                job: &self.job,
                group: self.pid,
            };
            (self.child.wait(), tree)
        }
    }

    /// A command's job as a [`Tree`]: Ctrl-C and Ctrl-Break go to its
    /// console process group as a Ctrl-Break (a new group has Ctrl-C
    /// disabled); a kill terminates every process of the job but lockbroker.
    pub struct JobTree<'a> {
        job: &'a Job,
        group: u32,
    }

    impl Tree for JobTree<'_> {
        fn signal(&self, sig: Signal) {
            // SAFETY: plain calls on our child's group and our job.
            unsafe {
                match sig {
                    Signal::Int | Signal::Term => {
                        // Without a console there is nobody to tell; the
                        // job is terminated after the grace.
                        GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, self.group);
                    }
                    Signal::Kill => terminate_others(self.job),
                }
            }
        }
    }
}
