//! The daemon's side of the admin API's [`Control`]: reloading through the
//! [`Reloader`], upgrading through the [`Upgrader`], and the upgrade's gate
//! saying whether everything was handed over.

use std::sync::{Arc, OnceLock};

use crate::handoff::{Gate, UpgradeError, Upgrader};
use crate::reload::Reloader;
use chatd_admin::control::{Control, ControlError, ReloadReport, UpgradeReport};
use chatd_hub::cluster_state::BoxFuture;
use chatd_hub::hub::Hub;

#[derive(Debug)]
pub struct Controls {
    pub hub: Hub,
    pub gate: Arc<Gate>,
    pub reloader: Reloader,
    /// Set by `main` once the process can upgrade itself.
    pub upgrader: OnceLock<Upgrader>,
}

impl Control for Controls {
    fn reload(&self) -> Result<ReloadReport, ControlError> {
        self.reloader
            .reload()
            .map_err(|e| ControlError::Config(e.to_string()))
    }

    fn upgrade(
        &self,
    ) -> Result<BoxFuture<'static, Result<UpgradeReport, ControlError>>, ControlError> {
        let upgrader = self
            .upgrader
            .get()
            .ok_or_else(|| refused(UpgradeError::Unavailable))?;
        let running = upgrader.start(&self.hub).map_err(refused)?;
        Ok(Box::pin(async move {
            let done = running.outcome().await.map_err(refused)?;
            Ok(UpgradeReport {
                pid: done.pid,
                duration: done.duration,
                clients: done.clients,
                dropped_tls: done.dropped_tls,
            })
        }))
    }

    fn handed_over(&self) -> bool {
        self.gate.committed()
    }
}

fn refused(e: UpgradeError) -> ControlError {
    match e {
        UpgradeError::Busy => ControlError::Busy(e.to_string()),
        e => ControlError::Upgrade(e.to_string()),
    }
}
