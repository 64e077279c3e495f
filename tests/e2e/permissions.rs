//! The per-role NATS users of `nats/accounts/claw.conf`: the services run as their roles and a
//! task goes end to end (HTTP and NATS-native), then each role is probed: what it needs works,
//! what it must not do is refused by the server (a `Permissions Violation` error, seen through
//! the client's event callback).

use std::time::Duration;

use async_nats::HeaderMap;
use claw_proto::topology::Settings;
use claw_proto::{Status, TaskRecord, connect};
use claw_tests::{
    AsUser, Gateway, Nats, archived_rows, bin, id_of, post_json, role_password, start_archiver,
    wait_for,
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn read_record(js: &async_nats::jetstream::Context, id: &str) -> Option<TaskRecord> {
    let kv = js.get_key_value("tasks").await.ok()?;
    let bytes = kv.get(id).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}

async fn wait_succeeded(js: &async_nats::jetstream::Context, id: &str) -> TaskRecord {
    wait_for(&format!("task {id} to succeed"), Duration::from_secs(30), || async {
        read_record(js, id).await.filter(|r| r.status == Status::Succeeded)
    })
    .await
}

/// A `claw-worker` process running as the worker role (its flags, not the harness's).
struct WorkerChild(std::process::Child);

impl Drop for WorkerChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker_as_role(nats: &Nats) -> WorkerChild {
    let config = nats.dir.path().join("worker.toml");
    std::fs::write(&config, "name = \"w-secure\"\nack_deadline_s = 2.0\n").unwrap();
    let child = std::process::Command::new(bin("claw-worker"))
        .arg("--config")
        .arg(&config)
        .args(["--nats-url", &nats.url(), "--nats-user", "worker"])
        .env("NATS_PASSWORD", role_password("worker"))
        .env("NATS_INBOX_PREFIX", "_INBOX.worker")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn claw-worker");
    WorkerChild(child)
}

#[tokio::test]
async fn each_role_can_do_its_job_and_nothing_else() {
    let nats = Nats::start_secure();

    // No anonymous access.
    assert!(
        connect::connect(&nats.args(), "anonymous").await.is_err(),
        "an anonymous client must be refused"
    );

    // The gateway role provisions the topology (with the files' 30 s ack deadline) ...
    let gw_topo = nats.role_topology("gateway", &Settings::standard()).await;
    let operator = AsUser::connect(&nats, "operator").await;
    let op_js = operator.js();
    let mut all_events = operator.client.subscribe("progress.>").await.unwrap();

    // ... the real claw-worker, as the worker role, sets its own 2 s deadline on the lanes ...
    let _worker = start_worker_as_role(&nats);
    wait_for("the worker to own the lanes' ack deadline", Duration::from_secs(20), || async {
        let stream = op_js.get_stream_no_info("TASKS").await.ok()?;
        let info = stream.consumer_info("short-normal").await.ok()?;
        (info.config.ack_wait == Duration::from_secs(2)).then_some(())
    })
    .await;

    // ... the archiver and the gateway run as theirs.
    let arch_topo = nats.role_topology("archiver", &Settings::standard()).await;
    let db = nats.dir.path().join("archive.sqlite");
    let _archiver = start_archiver(&arch_topo, &db);
    let gw = Gateway::start(&gw_topo, &[]).await;
    let http = reqwest::Client::new();

    // A task over HTTP goes end to end: queue, worker, record, events, archive, history.
    let response = http
        .post(gw.url("/v1/tasks"))
        .header("content-type", "application/json")
        .body(json!({"kind": "sleep", "session": "s1", "input": {"seconds": 0.1}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    wait_succeeded(&op_js, &id).await;
    wait_for("the archived row", Duration::from_secs(20), || async {
        (archived_rows(&db).await >= 1).then_some(())
    })
    .await;
    let page: Value =
        http.get(gw.url("/v1/tasks?session=s1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["tasks"][0]["id"], id.as_str(), "history through the archiver: {page}");
    let event = tokio::time::timeout(Duration::from_secs(5), all_events.next())
        .await
        .expect("the operator sees events")
        .unwrap();
    assert!(event.subject.starts_with("progress.s1."), "{}", event.subject);

    // Lane pause and the dequeue of a queued task (consumer pause, message get and delete).
    let paused = http.post(gw.url("/v1/lanes/long/low/pause")).send().await.unwrap();
    assert_eq!(paused.status(), StatusCode::OK);
    let spec =
        json!({"kind": "sleep", "class": "long", "priority": "low", "input": {"seconds": 0.1}});
    let queued_id = id_of(&post_json(&http, &gw.url("/v1/tasks"), Some(&spec)).await);
    let cancelled = post_json(&http, &gw.url(&format!("/v1/tasks/{queued_id}/cancel")), None).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let mut tasks = op_js.get_stream("TASKS").await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0, "the cancelled task left its lane");
    let pool = AsUser::connect(&nats, "worker").await;
    let mut doorbell = pool.client.subscribe("claw.doorbell.long").await.unwrap();
    pool.client.flush().await.unwrap();
    let resumed = http.post(gw.url("/v1/lanes/long/low/resume")).send().await.unwrap();
    assert_eq!(resumed.status(), StatusCode::OK);
    // The gateway role rings the class's doorbell, and the worker role hears it.
    tokio::time::timeout(Duration::from_secs(5), doorbell.next())
        .await
        .expect("the worker role hears the gateway's doorbell");
    pool.clean();

    // A principal that may run one task at a time: the second waits parked (the worker role
    // publishes it to `parked.*`, holds slots in the `slots` bucket), is woken into its lane
    // when the first ends (a direct get, a lane publish, a message delete), and runs.
    let token = "claw_perm-0123456789abcdef";
    let tokens = nats.dir.path().join("tokens.toml");
    let file = format!(
        "[principals.p]\ntokens = [\"{token}\"]\n[principals.p.limits]\nrunning_tasks = 1\n"
    );
    std::fs::write(&tokens, file).unwrap();
    let keyed = Gateway::start(&gw_topo, &["--tokens", tokens.to_str().unwrap()]).await;
    let mut keyed_ids = Vec::new();
    for _ in 0..2 {
        let response = http
            .post(keyed.url("/v1/tasks"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({"kind": "sleep", "input": {"seconds": 1.0}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        keyed_ids.push(id_of(&response.json::<Value>().await.unwrap()));
    }
    wait_for("the second task to wait parked", Duration::from_secs(10), || async {
        let r = read_record(&op_js, &keyed_ids[1]).await?;
        (r.status == Status::Queued && r.waiting.is_some()).then_some(())
    })
    .await;
    let first = wait_succeeded(&op_js, &keyed_ids[0]).await;
    let second = wait_succeeded(&op_js, &keyed_ids[1]).await;
    assert!(second.started_at >= first.finished_at, "one at a time: {first:?} {second:?}");
    wait_for("the parked copy to leave TASKS", Duration::from_secs(10), || async {
        let stream = op_js.get_stream("TASKS").await.ok()?;
        (stream.cached_info().state.messages == 0).then_some(())
    })
    .await;

    // --- publisher: a NATS-native task of its own session, its events, its record.
    let publisher = AsUser::connect(&nats, "publisher").await;
    let pub_js = publisher.js();
    let mut own_events = publisher.client.subscribe("progress.publisher.*").await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "pub-task-1");
    let spec = json!({"kind": "sleep", "session": "publisher", "input": {"seconds": 0.1}});
    pub_js
        .publish_with_headers("tasks.short.normal", headers, spec.to_string().into())
        .await
        .unwrap()
        .await
        .expect("the publisher gets the JetStream ack");
    let seen = tokio::time::timeout(Duration::from_secs(10), own_events.next())
        .await
        .expect("the publisher sees its own session's events")
        .unwrap();
    assert_eq!(seen.subject.as_str(), "progress.publisher.pub-task-1");
    assert_eq!(wait_succeeded(&pub_js, "pub-task-1").await.session.as_str(), "publisher");
    let got = publisher.client.request("claw.api.get", "pub-task-1".into()).await.unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&got.payload).unwrap()["id"], "pub-task-1");
    let submitted = publisher
        .client
        .request(
            "claw.api.submit",
            json!({"kind": "sleep", "session": "publisher"}).to_string().into(),
        )
        .await
        .unwrap();
    let submitted: Value = serde_json::from_slice(&submitted.payload).unwrap();
    wait_succeeded(&pub_js, submitted["id"].as_str().expect("a record")).await;
    publisher.clean();

    publisher.refused_publish("$JS.API.STREAM.DELETE.TASKS").await;
    publisher.refused_publish("$JS.API.STREAM.PURGE.TASKS").await;
    publisher.refused_publish("$KV.tasks.pub-task-1").await;
    publisher.refused_publish("progress.s1.forged").await;
    publisher.refused_publish("progress.alice.s1.forged").await;
    publisher.refused_publish("$JS.API.CONSUMER.MSG.NEXT.TASKS.short-normal").await;
    publisher.refused_publish("$JS.API.CONSUMER.CREATE.TASKS.steal.tasks.short.normal").await;
    publisher.refused_publish("claw.api.cancel").await;
    publisher.refused_publish("dlq.short.normal").await;
    publisher.refused_subscribe("progress.s1.*").await;
    publisher.refused_subscribe("progress.>").await;
    publisher.refused_subscribe("$KV.tasks.>").await;
    publisher.refused_subscribe("_INBOX.>").await;
    publisher.refused_subscribe("_INBOX.gateway.>").await;
    publisher.refused_subscribe("claw.api.>").await;

    // --- operator: reads everything, changes nothing.
    op_js.get_stream("DLQ").await.expect("stream info");
    op_js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "short-normal",
            "TASKS",
        )
        .await
        .expect("consumer info");
    assert!(read_record(&op_js, &id).await.is_some(), "KV get");
    let lanes = operator.client.request("claw.api.lanes", "{}".into()).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&lanes.payload).unwrap()["lanes"].as_array().map(Vec::len),
        Some(6)
    );
    let history = operator.client.request("claw.archive.list", "{}".into()).await.unwrap();
    assert!(serde_json::from_slice::<Value>(&history.payload).unwrap()["tasks"].is_array());
    operator.clean();

    operator.refused_publish("tasks.short.normal").await;
    operator.refused_publish("$JS.API.STREAM.DELETE.TASKS").await;
    operator.refused_publish("$JS.API.STREAM.UPDATE.TASKS").await;
    operator.refused_publish("$JS.API.CONSUMER.PAUSE.TASKS.short-high").await;
    operator.refused_publish("$JS.API.CONSUMER.CREATE.TASKS.x.tasks.short.high").await;
    operator.refused_publish("$JS.API.STREAM.MSG.DELETE.TASKS").await;
    operator.refused_publish("$KV.tasks.x").await;
    operator.refused_publish("claw.api.cancel").await;
    operator.refused_publish("claw.api.submit").await;
    operator.refused_publish("claw.control.x").await;
    operator.refused_subscribe("claw.api.>").await;

    // --- the services' roles cannot do each other's jobs or destroy anything.
    let worker = AsUser::connect(&nats, "worker").await;
    worker.refused_publish("$JS.API.STREAM.DELETE.TASKS").await;
    worker.refused_publish("$JS.API.STREAM.PURGE.TASKS").await;
    worker.refused_publish("$JS.API.CONSUMER.DELETE.TASKS.short-high").await;
    worker.refused_publish("$KV.tickets.x").await;
    worker.refused_publish("$JS.API.STREAM.PURGE.KV_slots").await;
    worker.refused_publish("claw.api.submit").await;
    worker.refused_subscribe("_INBOX.gateway.>").await;
    worker.refused_subscribe("claw.api.>").await;

    // The archiver writes records, lanes and events only for the reconciler's repairs (tested
    // as its role in `the_archiver_role_repairs_and_removes_records`), and nothing else.
    let archiver = AsUser::connect(&nats, "archiver").await;
    archiver.refused_publish("$JS.API.STREAM.DELETE.KV_tasks").await;
    archiver.refused_publish("$JS.API.STREAM.PURGE.KV_tasks").await;
    archiver.refused_publish("$JS.API.STREAM.MSG.DELETE.TASKS").await;
    archiver.refused_publish("$JS.API.CONSUMER.MSG.NEXT.TASKS.short-high").await;
    // Its reading consumers are on the bucket's stream only.
    archiver.refused_publish("$JS.API.CONSUMER.CREATE.TASKS.x.tasks.short.high").await;
    archiver.refused_publish("$JS.API.CONSUMER.DELETE.TASKS.short-high").await;
    archiver.refused_publish("dlq.short.normal").await;
    archiver.refused_publish("claw.control.x").await;
    archiver.refused_publish("claw.api.cancel").await;
    archiver.refused_subscribe("progress.>").await;
    archiver.refused_subscribe("tasks.*.*").await;

    let gateway = AsUser::connect(&nats, "gateway").await;
    // A principal's events are stored under its namespace, `progress.<owner>.<session>.<id>`.
    let ack = gateway.js().publish("progress.alice.perm-session.t1", "{}".into()).await;
    ack.expect("publish a principal's event").await.expect("PROGRESS stores it");
    // It issues and redeems WebSocket tickets: create, read, purge-if-unchanged.
    let tickets = gateway.js().get_key_value("tickets").await.expect("the tickets bucket");
    let revision = tickets.create("perm-ticket", "{}".into()).await.expect("issue a ticket");
    let entry = tickets.entry("perm-ticket").await.expect("read a ticket").expect("there");
    assert_eq!(entry.revision, revision);
    tickets.purge_expect_revision("perm-ticket", Some(revision)).await.expect("redeem it");
    gateway.clean();
    gateway.refused_publish("$JS.API.STREAM.DELETE.TASKS").await;
    gateway.refused_publish("$JS.API.STREAM.PURGE.KV_tasks").await;
    gateway.refused_publish("$JS.API.CONSUMER.MSG.NEXT.TASKS.short-high").await;
    gateway.refused_publish("dlq.short.high").await;
    gateway.refused_subscribe("_INBOX.>").await;
    gateway.refused_subscribe("tasks.*.*").await;

    // Nothing was destroyed: every stream is still there.
    for stream in ["TASKS", "PROGRESS", "DLQ", "KV_tasks"] {
        op_js.get_stream(stream).await.unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    }
}

/// The archiver as its role does what its retention sweep and reconciler need: it lists the
/// lanes, re-reads and compare-and-sets a stranded record, publishes a task again and announces
/// a change, and removes an archived record from the bucket.
#[tokio::test]
async fn the_archiver_role_repairs_and_removes_records() {
    use claw_proto::kinds::Catalog;
    use claw_proto::spec::{Limits, TaskSpec};
    let nats = Nats::start_secure();
    let gw_topo = nats.role_topology("gateway", &Settings::standard()).await;
    let operator = AsUser::connect(&nats, "operator").await;
    let op_js = operator.js();
    let mut events = operator.client.subscribe("progress.>").await.unwrap();

    let arch_topo = nats.role_topology("archiver", &Settings::standard()).await;
    let mut config = claw_tests::archiver_config(&nats.dir.path().join("archive.sqlite"));
    config.retention.retention_s = 1;
    config.retention.sweep_s = 1;
    config.reconcile.interval_s = 1;
    config.reconcile.grace_s = 1;
    let _archiver = claw_tests::start_archiver_with(&arch_topo, config);

    // Two orphans, as a gateway that died before its lane publish leaves them: one to publish
    // again, one whose deadline has passed, to fail.
    let spec = TaskSpec::from_slice(br#"{"kind": "sleep"}"#).unwrap();
    let admit = |created| {
        spec.admit(
            claw_proto::TaskId::generate(),
            created,
            None,
            &Catalog::builtin(),
            &Limits::STANDARD,
        )
        .unwrap()
    };
    let now = time::OffsetDateTime::now_utc();
    let queued = admit(now);
    let mut late = admit(now);
    late.deadline = now;
    // Its input stored, as the gateway stores a large one: the archiver removes it with the
    // record.
    let stored = gw_topo
        .payloads
        .put(&late.id, claw_proto::payloads::Part::Input, br#"{"seconds": 0}"#)
        .await
        .expect("the gateway stores an input");
    late.input_ref = Some(stored.clone());
    gw_topo.records.create(&queued).await.unwrap();
    gw_topo.records.create(&late).await.unwrap();

    wait_for("the orphan published to its lane", Duration::from_secs(20), || async {
        let mut tasks = op_js.get_stream("TASKS").await.ok()?;
        (tasks.info().await.ok()?.state.messages == 1).then_some(())
    })
    .await;
    let failed = wait_for("the late orphan failed", Duration::from_secs(20), || async {
        read_record(&op_js, late.id.as_str()).await.filter(|r| r.status == Status::Failed)
    })
    .await;
    assert_eq!(failed.cause, Some(claw_proto::Cause::Timeout));
    let announced = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            let event: Value = serde_json::from_slice(&event.payload).unwrap();
            if event["task_id"] == late.id.as_str() && event["data"]["status"] == "failed" {
                return;
            }
        }
    })
    .await;
    assert!(announced.is_ok(), "the failed status event was published");
    // Archived, then out of the bucket after its second of retention.
    wait_for("the failed record removed from the bucket", Duration::from_secs(20), || async {
        read_record(&op_js, late.id.as_str()).await.is_none().then_some(())
    })
    .await;
    let archived = operator.client.request("claw.archive.get", late.id.to_string().into()).await;
    let archived: Value = serde_json::from_slice(&archived.unwrap().payload).unwrap();
    assert_eq!(archived["status"], "failed", "{archived}");
    wait_for("its stored input removed with it", Duration::from_secs(20), || async {
        matches!(
            gw_topo.payloads.read(&stored).await,
            Err(claw_proto::payloads::Error::NotFound(_))
        )
        .then_some(())
    })
    .await;
}

/// Makes a CA and a server and a client certificate signed by it with the `openssl` CLI, in
/// `dir`; `None` when `openssl` is not installed.
fn make_certificates(dir: &std::path::Path) -> Option<()> {
    let openssl = |args: &[&str]| {
        let out =
            std::process::Command::new("openssl").current_dir(dir).args(args).output().ok()?;
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Some(())
    };
    std::fs::create_dir_all(dir).unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=claw-test-ca",
    ])?;
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=claw-test-{name}"),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    Some(())
}

#[tokio::test]
async fn services_connect_over_mutual_tls() {
    claw_tests::init_tracing();
    let dir = claw_tests::TestDir::new();
    let certs = dir.path().join("tls");
    if make_certificates(&certs).is_none() {
        eprintln!("openssl not installed: TLS test skipped");
        return;
    }
    let pem = |name: &str| certs.join(name).display().to_string();
    let config = dir.path().join("tls.conf");
    std::fs::write(
        &config,
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            pem("server.pem"),
            pem("server-key.pem"),
            pem("ca.pem")
        ),
    )
    .unwrap();
    let server = claw_proto::nats_server::NatsServer::start(claw_proto::nats_server::Options {
        config: Some(config),
        ..claw_proto::nats_server::Options::in_dir(dir.path().join("nats"))
    })
    .expect("start nats-server with TLS");

    let plain = connect::NatsArgs::url(server.url());
    let tls = connect::NatsArgs {
        nats_tls_ca: Some(certs.join("ca.pem")),
        nats_tls_cert: Some(certs.join("client.pem")),
        nats_tls_key: Some(certs.join("client-key.pem")),
        ..plain.clone()
    };
    let client = connect::connect(&tls, "tls-test").await.expect("connect with the client cert");
    claw_proto::topology::ensure(&connect::jetstream(client), &Settings::standard())
        .await
        .expect("JetStream over TLS");

    let no_client_cert =
        connect::NatsArgs { nats_tls_ca: Some(certs.join("ca.pem")), ..plain.clone() };
    assert!(
        connect::connect(&no_client_cert, "tls-test").await.is_err(),
        "mTLS must need a client cert"
    );
    let unknown_ca =
        connect::NatsArgs { nats_tls_ca: None, nats_tls_required: true, ..tls.clone() };
    assert!(
        connect::connect(&unknown_ca, "tls-test").await.is_err(),
        "an unknown CA must be refused"
    );
}
