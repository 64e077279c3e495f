//! The gateway's shared state: one NATS connection and the handles derived from it, built once
//! and cloned into every request (an `Arc` inside, so a clone is a pointer copy).

use std::sync::Arc;

use async_nats::jetstream;
use claw_proto::kinds::Catalog;
use claw_proto::payloads::Payloads;
use claw_proto::records::Records;
use claw_proto::spec::Limits;
use claw_proto::topology::{self, Topology};
use std::time::Duration;

use crate::quota::Quotas;
use crate::tickets::Tickets;

use crate::Config;
use crate::auth::Auth;
use crate::browser::Hosts;
use crate::error::Error;

#[derive(Clone, Debug)]
pub struct App(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Task records (`claw_proto::records`): every read and write of the bucket.
    pub records: Records,
    /// Inputs and results too large for a record, capped at the configured payload size.
    pub payloads: Payloads,
    /// API tokens, or none (every caller anonymous).
    pub auth: Auth,
    /// Each principal's use of its limits (from the tokens file).
    pub quotas: Quotas,
    /// Single-use WebSocket tickets (the `tickets` bucket).
    pub tickets: Tickets,
    pub catalog: Catalog,
    pub limits: Limits,
    /// The names the gateway answers (`browser`), from the bound address and `--allowed-host`.
    pub hosts: Hosts,
    pub config: Config,
}

impl std::ops::Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    pub async fn new(topology: Topology, config: Config) -> Result<App, Error> {
        let auth = Auth::load(config.tokens.as_deref())?;
        // Without tokens no ticket is stored or checked, and a start needs no NATS round trip.
        let tickets = if auth.is_on() {
            Some(topology.js.get_key_value(topology::TICKETS_BUCKET).await.map_err(|e| {
                Error::Unavailable(format!("bucket {}: {e}", topology::TICKETS_BUCKET))
            })?)
        } else {
            None
        };
        let tickets = Tickets::new(tickets, Duration::from_secs(config.ws_ticket_s));
        let quotas = match &auth {
            Auth::Tokens(tokens) => Quotas::new(tokens.quotas()),
            Auth::Off => Quotas::default(),
        };
        Ok(App(Arc::new(Inner {
            client: topology.js.client(),
            js: topology.js,
            records: topology.records,
            payloads: topology.payloads.with_max_bytes(config.payload_max_bytes),
            auth,
            quotas,
            tickets,
            catalog: config.catalog(),
            limits: config.limits(),
            hosts: Hosts::new(config.bound, &config.allowed_hosts),
            config,
        })))
    }

    /// Refuses at once when the connection is down, instead of queueing the publish in the
    /// client and answering 503 only after the ack timeout.
    pub fn ensure_connected(&self) -> Result<(), Error> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(Error::Unavailable(format!("NATS connection is {state}"))),
        }
    }
}
