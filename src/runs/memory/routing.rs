//! [`RunRouting`] in process: aborts and approval answers go straight into the
//! run's control channel; running runs are read from the sessions' state.

use async_trait::async_trait;

use super::MemoryRegistry;
use crate::{
    protocol::PermissionAnswer,
    runs::{Control, RegistryError, RunRouting, RunningRun},
    sync::lock_unpoisoned,
};

#[async_trait]
impl RunRouting for MemoryRegistry {
    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
        let control = {
            let sessions = lock_unpoisoned(&self.inner.sessions);
            match sessions.get(session_id).and_then(|s| s.run.as_ref()) {
                Some(run) if run.user_id == user_id => Some((
                    run.control.clone(),
                    Control::Abort { session_id: session_id.to_string(), run_id: run.run_id.to_string() },
                )),
                _ => None,
            }
        };
        let Some((tx, message)) = control else { return Ok(false) };
        tx.send(message).await.map_err(|_| RegistryError::Unavailable("run is shutting down".into()))?;
        Ok(true)
    }

    async fn route_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError> {
        let Some(session_id) = lock_unpoisoned(&self.inner.permissions).get(request_id).cloned() else {
            return Ok(false);
        };
        let tx = {
            let sessions = lock_unpoisoned(&self.inner.sessions);
            match sessions.get(&session_id).and_then(|s| s.run.as_ref()) {
                Some(run) if run.user_id == user_id && run.pending.iter().any(|(id, _)| id == request_id) => {
                    run.control.clone()
                }
                _ => return Ok(false),
            }
        };
        let message = Control::Permission { session_id, request_id: request_id.to_string(), answer };
        Ok(tx.send(message).await.is_ok())
    }

    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
        let sessions = lock_unpoisoned(&self.inner.sessions);
        let mut runs: Vec<RunningRun> = sessions
            .iter()
            .filter_map(|(session_id, state)| {
                let run = state.run.as_ref().filter(|r| r.user_id == user_id)?;
                Some(RunningRun {
                    session_id: session_id.clone(),
                    provider: run.provider.clone(),
                    run_id: run.run_id.to_string(),
                    started_at: run.started_at.clone(),
                    last_seq: state.last_seq,
                    node_id: run.node_id.clone(),
                    user_id: run.user_id.clone(),
                })
            })
            .collect();
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        Ok(runs)
    }
}
