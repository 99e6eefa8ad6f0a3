//! `single-profile-handler`: run every profile once; the one profile is primary.

use std::sync::Arc;

use crate::framework::scheduling::{
    ProfileHandler, ProfileRun, SchedulingError, SchedulingRequest, SchedulingResult,
};

/// See the module docs. The config loader refuses it with more than one profile.
#[derive(Debug, Default)]
pub struct SingleProfileHandler;

impl ProfileHandler for SingleProfileHandler {
    fn pick_profiles(
        &self,
        _req: &SchedulingRequest<'_>,
        profile_names: &[Arc<str>],
        runs: &[ProfileRun],
    ) -> Vec<usize> {
        if runs.is_empty() {
            (0..profile_names.len()).collect()
        } else {
            Vec::new()
        }
    }

    fn process_results(
        &self,
        _req: &SchedulingRequest<'_>,
        runs: Vec<ProfileRun>,
    ) -> Result<SchedulingResult, SchedulingError> {
        if runs.len() != 1 {
            return Err(SchedulingError::Handler(format!(
                "single-profile-handler expects exactly one profile result, got {}",
                runs.len()
            )));
        }
        if let Some(Err(e)) = runs.first().map(|r| &r.outcome) {
            return Err(e.clone());
        }
        Ok(SchedulingResult { runs, primary: 0 })
    }
}
