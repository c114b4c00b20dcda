//! `lockbrokerd` as a Windows service: installing and removing it, and
//! running under the service control manager (SCM), whose stop (or the
//! system's shutdown) shuts the daemon down as Ctrl-C does — every
//! session told `ShuttingDown`, everything released. The installed
//! service runs as SYSTEM and, unless told otherwise, serves the global
//! pipe, which clients trust when SYSTEM serves it.

use std::ffi::OsString;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use crate::config::Config;

/// The configuration the SCM's thread serves, set before dispatching.
static SERVICE: OnceLock<(String, Config)> = OnceLock::new();

/// Installs the service `name`, to run this executable with `args` (the
/// command line given, without `--install-service`) and `--service`.
pub fn install(name: &str, args: Vec<OsString>) -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("opening the service control manager")?;
    let mut launch_arguments = args;
    launch_arguments.push("--service".into());
    let info = ServiceInfo {
        name: name.into(),
        display_name: format!("lockbroker daemon ({name})").into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe().context("finding lockbrokerd's path")?,
        launch_arguments,
        dependencies: vec![],
        account_name: None, // SYSTEM
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG)
        .with_context(|| format!("installing the service {name}"))?;
    service
        .set_description("Named FIFO mutexes, semaphores and rwlocks that die with their holder")
        .with_context(|| format!("describing the service {name}"))?;
    Ok(())
}

/// Stops the service `name` if it runs, and removes it.
pub fn uninstall(name: &str) -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("opening the service control manager")?;
    let service = manager
        .open_service(
            name,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("opening the service {name}"))?;
    // Marked for deletion first: the SCM removes it once it has stopped.
    service
        .delete()
        .with_context(|| format!("removing the service {name}"))?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service
            .stop()
            .with_context(|| format!("stopping the service {name}"))?;
    }
    Ok(())
}

/// Runs under the SCM as service `name`, serving `config` until the SCM
/// stops it. Returns when the service has stopped.
pub fn run(name: String, config: Config) -> anyhow::Result<()> {
    SERVICE
        .set((name.clone(), config))
        .map_err(|_| anyhow::anyhow!("the service runs once per process"))?;
    service_dispatcher::start(&name, ffi_service_main)
        .context("connecting to the service control manager (is this a service?)")
}

define_windows_service!(ffi_service_main, service_main);

/// The SCM's thread: the service's whole life.
fn service_main(_arguments: Vec<OsString>) {
    let (name, config) = SERVICE.get().expect("set before dispatching");
    if let Err(e) = serve(name, config) {
        tracing::error!("the service failed: {e:#}");
    }
}

fn status(state: ServiceState, accept: ServiceControlAccept, exit: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: accept,
        exit_code: ServiceExitCode::Win32(exit),
        checkpoint: 0,
        wait_hint: Duration::from_secs(10),
        process_id: None,
    }
}

fn serve(name: &str, config: &Config) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_tx = Mutex::new(Some(stop_tx));
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            if let Some(tx) = stop_tx.lock().expect("not poisoned").take() {
                let _ = tx.send(());
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = service_control_handler::register(name, handler)
        .context("registering the service's control handler")?;
    let stopped = async {
        let _ = stop_rx.await;
        tracing::info!("the service control manager asked the service to stop");
    };
    let served = crate::program::serve(
        config,
        || Ok(stopped),
        || {
            // Listening: the service is running.
            let _ = handle.set_service_status(status(
                ServiceState::Running,
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
                0,
            ));
        },
    );
    let exit = if served.is_ok() { 0 } else { 1 };
    handle.set_service_status(status(
        ServiceState::Stopped,
        ServiceControlAccept::empty(),
        exit,
    ))?;
    served
}
