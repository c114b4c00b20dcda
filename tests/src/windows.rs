//! Processes on Windows, for tests: console control events (the Windows
//! counterpart of signals) and telling Wine from Windows, for the few
//! checks Wine cannot make (it ignores `FILE_FLAG_FIRST_PIPE_INSTANCE`).

use std::os::windows::process::CommandExt;
use std::process::Command;

/// `CREATE_NEW_PROCESS_GROUP`: the child leads a console process group of
/// its own, so that a Ctrl-Break can be sent to it alone.
pub const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;

/// Makes `cmd` start its own console process group (see [`ctrl_break`]).
pub fn own_group(cmd: &mut Command) -> &mut Command {
    cmd.creation_flags(CREATE_NEW_PROCESS_GROUP)
}

/// Sends Ctrl-Break to the console process group `pid` leads (a child
/// started with [`own_group`]); false if the system refused.
pub fn ctrl_break(pid: u32) -> bool {
    use windows_sys::Win32::System::Console::{CTRL_BREAK_EVENT, GenerateConsoleCtrlEvent};
    // SAFETY: a plain call; it signals the group, not this process.
    unsafe { GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, pid) != 0 }
}

/// Whether this process has a console (that its children share), making
/// one if it has none. Under Wine without a display, none can be made:
/// console events cannot be sent there.
pub fn has_console() -> bool {
    use windows_sys::Win32::System::Console::{AllocConsole, GetConsoleWindow};
    // SAFETY: plain calls without arguments.
    unsafe { !GetConsoleWindow().is_null() || AllocConsole() != 0 }
}

/// Whether this runs under Wine (whose ntdll exports `wine_get_version`).
pub fn is_wine() -> bool {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleA, GetProcAddress};
    // SAFETY: looking up an export by a NUL-terminated name.
    unsafe {
        let ntdll = GetModuleHandleA(c"ntdll.dll".as_ptr().cast());
        !ntdll.is_null() && GetProcAddress(ntdll, c"wine_get_version".as_ptr().cast()).is_some()
    }
}

/// Terminates process `pid` as `taskkill /F` does (no chance to clean
/// up); false if it could not be opened (gone already).
pub fn kill(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{OpenProcess, PROCESS_TERMINATE, TerminateProcess};
    // SAFETY: a handle opened and closed here.
    unsafe {
        let process = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if process.is_null() {
            return false;
        }
        let ok = TerminateProcess(process, 1) != 0;
        CloseHandle(process);
        ok
    }
}

/// Whether process `pid` still runs.
pub fn alive(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, STILL_ACTIVE};
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    // SAFETY: a handle opened and closed here; a local out-parameter.
    unsafe {
        let process = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if process.is_null() {
            return false;
        }
        let mut code = 0u32;
        let ok = GetExitCodeProcess(process, &mut code) != 0;
        CloseHandle(process);
        ok && code == STILL_ACTIVE as u32
    }
}
