//! The shutdown signal handed to every session.
//!
//! The server owns the sending side ([`ShutdownTrigger`]); each session gets
//! a [`Shutdown`] and selects on [`Shutdown::recv`] beside its socket. A
//! `watch` channel is used so a session that
//! starts after the signal still sees it.

use tokio::sync::watch;

/// Fires the signal; dropping it fires it too, so sessions never outlive the
/// server that spawned them.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Listens for the signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every listener to shut down.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.fire();
    }
}

impl Shutdown {
    /// Waits until the signal fires (or its trigger is gone). Cancel-safe.
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped, which fires the signal.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
