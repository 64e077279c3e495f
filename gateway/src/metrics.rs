//! Prometheus metrics: the process-wide recorder lives in [`claw_proto::metrics`] (so the worker
//! and the archiver record into it too, and `claw up` shows all three here); the gateway adds its
//! lanes' depth, in-flight count and paused state, refreshed on each scrape.

use claw_proto::topology::Lane;

use crate::app::App;

pub use claw_proto::metrics::install;

/// Refreshes the lane gauges (one consumer-info request per lane), then renders everything. A
/// lane that cannot be read keeps its last value; the scrape still answers.
pub async fn render(app: &App) -> String {
    match crate::lanes::list(app).await {
        Ok(lanes) => {
            for lane in lanes {
                let labels = [("class", lane.class.as_str()), ("priority", lane.priority.as_str())];
                metrics::gauge!("claw_gateway_lane_depth", &labels).set(lane.depth as f64);
                metrics::gauge!("claw_gateway_lane_in_flight", &labels).set(lane.in_flight as f64);
                let paused = if lane.paused { 1.0 } else { 0.0 };
                metrics::gauge!("claw_gateway_lane_paused", &labels).set(paused);
            }
        }
        Err(e) => tracing::debug!(error = %e, lanes = Lane::ALL.len(), "lane gauges not refreshed"),
    }
    claw_proto::metrics::render().await
}
