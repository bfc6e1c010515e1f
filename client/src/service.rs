//! Windows service mode: `synchub-agent service install|uninstall|start|stop`, and `service
//! run`, which the service manager starts. The service reads its configuration from
//! `%ProgramData%\synchub\agent.toml` when present and from `SYNCHUB_*` variables of its own
//! environment (which the MSI sets from its properties), and logs to daily files under
//! `%ProgramData%\synchub\logs\` (a week kept); a stop from the service manager shuts the agent
//! down cleanly (no apply is cut in half: the apply is crash-safe anyway).

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use windows_service::service::{
    ServiceAccess, ServiceControl, ServiceControlAccept, ServiceErrorControl, ServiceExitCode,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name in the service manager.
pub const SERVICE_NAME: &str = "synchub-agent";
const DISPLAY_NAME: &str = "synchub agent";
const SERVICE_TYPE: ServiceType = ServiceType::OWN_PROCESS;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service manager: {0}")]
    Manager(#[from] windows_service::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the service did not reach {0} within 30 s")]
    Timeout(&'static str),
    #[error("the agent stopped with an error: {0}")]
    Agent(String),
}

/// `%ProgramData%\synchub`: configuration, logs and (by default) data.
pub fn program_data_dir() -> PathBuf {
    std::env::var_os("ProgramData")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
        .join("synchub")
}

/// The configuration file the service reads.
pub fn config_path() -> PathBuf {
    program_data_dir().join("agent.toml")
}

/// Where the service writes its log files.
pub fn log_dir() -> PathBuf {
    program_data_dir().join("logs")
}

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, ServiceError> {
    Ok(ServiceManager::local_computer(None::<&str>, access)?)
}

/// Registers this exe as an automatic-start service running `service run`.
pub fn install() -> Result<(), ServiceError> {
    let info = ServiceInfo {
        name: OsString::from(SERVICE_NAME),
        display_name: OsString::from(DISPLAY_NAME),
        service_type: SERVICE_TYPE,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe()?,
        launch_arguments: vec![OsString::from("service"), OsString::from("run")],
        dependencies: vec![],
        account_name: None, // LocalSystem: it writes under %ProgramData%
        account_password: None,
    };
    let m = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let service = m.create_service(&info, ServiceAccess::CHANGE_CONFIG)?;
    service.set_description("Keeps the local copy of synchub spaces in sync")?;
    Ok(())
}

/// Stops (when running) and removes the service.
pub fn uninstall() -> Result<(), ServiceError> {
    let m = manager(ServiceManagerAccess::CONNECT)?;
    let service = m.open_service(
        SERVICE_NAME,
        ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
    )?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
    }
    service.delete()?;
    Ok(())
}

/// Starts the service and waits until it runs.
pub fn start() -> Result<(), ServiceError> {
    let m = manager(ServiceManagerAccess::CONNECT)?;
    let service = m.open_service(
        SERVICE_NAME,
        ServiceAccess::START | ServiceAccess::QUERY_STATUS,
    )?;
    service.start::<&OsStr>(&[])?;
    wait_for(
        || Ok(service.query_status()?.current_state == ServiceState::Running),
        "running",
    )
}

/// Asks the service to stop and waits until it has.
pub fn stop() -> Result<(), ServiceError> {
    let m = manager(ServiceManagerAccess::CONNECT)?;
    let service = m.open_service(
        SERVICE_NAME,
        ServiceAccess::STOP | ServiceAccess::QUERY_STATUS,
    )?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop()?;
    }
    wait_for(
        || Ok(service.query_status()?.current_state == ServiceState::Stopped),
        "stopped",
    )
}

fn wait_for(
    mut done: impl FnMut() -> Result<bool, ServiceError>,
    what: &'static str,
) -> Result<(), ServiceError> {
    let started = Instant::now();
    while !done()? {
        if started.elapsed() > Duration::from_secs(30) {
            return Err(ServiceError::Timeout(what));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// What the service runs: the agent, until the receiver fires (a stop from the manager).
pub type ServiceBody =
    Box<dyn FnOnce(tokio::sync::oneshot::Receiver<()>) -> Result<(), String> + Send>;

static BODY: Mutex<Option<ServiceBody>> = Mutex::new(None);

define_windows_service!(ffi_service_main, service_main);

/// Hands this process to the service manager, which calls `body` on its own thread; returns
/// when the service has stopped. Only works when the service manager started the process.
pub fn run(body: ServiceBody) -> Result<(), ServiceError> {
    *BODY.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main)?;
    Ok(())
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = run_service() {
        tracing::error!(error = %e, "service failed");
    }
}

fn status(state: ServiceState, exit: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: SERVICE_TYPE,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: ServiceExitCode::Win32(exit),
        checkpoint: 0,
        wait_hint: Duration::from_secs(if state == ServiceState::StopPending {
            30
        } else {
            0
        }),
        process_id: None,
    }
}

fn run_service() -> Result<(), ServiceError> {
    let body = BODY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| ServiceError::Agent("service started twice".into()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let stop_tx = Mutex::new(Some(stop_tx));
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            if let Some(tx) = stop_tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = service_control_handler::register(SERVICE_NAME, handler)?;
    handle.set_service_status(status(ServiceState::Running, 0))?;
    tracing::info!("service running");
    let result = body(stop_rx);
    if let Err(e) = &result {
        // Logged here: once the manager hears "stopped" it may end the process at any time.
        tracing::error!(error = %e, "the agent stopped with an error");
    }
    handle.set_service_status(status(ServiceState::StopPending, 0))?;
    let exit = if result.is_ok() { 0 } else { 1 };
    handle.set_service_status(status(ServiceState::Stopped, exit))?;
    tracing::info!("service stopped");
    result.map_err(ServiceError::Agent)
}
