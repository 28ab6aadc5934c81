//! Sessions with one owner and transactions that cannot leak, against a real PostgreSQL
//! through a real pgBouncer in transaction pooling: a transaction dropped half-way (a
//! cancelled future) never reaches the session's next owner, its owner's next statement starts
//! clean, and a second loop never waits behind a transaction.

mod common;

use std::time::{Duration, Instant};

use common::TestBed;
use pemworker::connection::manager::Manager;
use pemworker::connection::pool;
use tokio_postgres::types::Type;

async fn scalar_i64(s: &mut pemworker::connection::session::Session, sql: &str) -> i64 {
    let row = s.query_one(sql, sql, &[]).await.unwrap();
    pool::get::<i64>(&row, 0, sql).unwrap()
}

/// A manager for the PEM admin through pgBouncer, and a table it may write.
async fn setup(bed: &TestBed) -> Manager {
    let su = bed.connect(&bed.superuser()).await;
    pool::batch(
        &su,
        "table",
        &format!(
            "CREATE TABLE public.owned (n int); GRANT SELECT, INSERT ON public.owned TO {}",
            common::ADMIN_USER
        ),
    )
    .await
    .unwrap();
    Manager::new(
        "PEM server",
        vec![bed.admin_via_pooler()],
        None,
        Duration::from_secs(5),
    )
}

async fn stored(bed: &TestBed) -> i64 {
    let su = bed.connect(&bed.superuser()).await;
    pool::query_one(&su, "count", "SELECT count(*) FROM public.owned", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_transaction_never_reaches_the_next_owner() {
    let bed = TestBed::start();
    let manager = setup(&bed).await;

    // A transaction inserts, then its future is dropped while a statement runs.
    let mut s = manager.checkout().await.unwrap();
    let cancelled = tokio::time::timeout(Duration::from_millis(500), async {
        let mut tx = s.begin("a test").await.unwrap();
        tx.execute("inserting", "INSERT INTO public.owned VALUES (1)", &[])
            .await
            .unwrap();
        tx.execute("sleeping", "SELECT pg_sleep(3)", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    assert!(cancelled.is_err(), "the transaction was cut off");
    assert!(s.in_transaction(), "the session knows it is dirty");
    assert!(!s.is_reusable());
    drop(s);
    assert_eq!(
        manager.idle_sessions(),
        0,
        "a dirty session is closed, not kept"
    );

    // The next owner gets another session, outside any transaction, without the insert.
    let mut next = manager.checkout().await.unwrap();
    let (old, now): (bool, bool) = {
        let row = next
            .query_one(
                "state",
                "SELECT pg_current_xact_id_if_assigned() IS NULL, current_setting('transaction_read_only') = 'off'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        old && now,
        "the next owner is not inside an old transaction"
    );
    assert_eq!(
        scalar_i64(&mut next, "SELECT count(*) FROM public.owned").await,
        0
    );
    drop(next);
    assert_eq!(manager.idle_sessions(), 1, "a clean session is kept");
    assert_eq!(stored(&bed).await, 0, "nothing was committed");

    // The server side of the abandoned session ends too (pgBouncer drops its server
    // connection, so the insert is rolled back, not left idle in transaction).
    let su = bed.connect(&bed.superuser()).await;
    let limit = Instant::now() + Duration::from_secs(20);
    loop {
        let open: i64 = pool::query_one(
            &su,
            "open",
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND usename = $1",
            &[(&common::ADMIN_USER, Type::TEXT)],
        )
        .await
        .unwrap()
        .get(0);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < limit,
            "a transaction stays open on the server"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_of_an_abandoned_transaction_starts_clean_and_commits_explicitly() {
    let bed = TestBed::start();
    let manager = setup(&bed).await;
    let mut s = manager.checkout().await.unwrap();

    // Begun with the pinned preamble: read-write, search_path and timeouts set locally.
    {
        let mut tx = s.begin("a test").await.unwrap();
        let rows = tx
            .query(
                "settings",
                "SELECT current_setting('search_path'), current_setting('transaction_read_only'), current_setting('statement_timeout')",
                &[],
            )
            .await
            .unwrap();
        let (path, ro, timeout): (String, String, String) =
            (rows[0].get(0), rows[0].get(1), rows[0].get(2));
        assert_eq!(
            (path.as_str(), ro.as_str(), timeout.as_str()),
            ("pg_catalog, pg_temp", "off", "30s")
        );
        tx.execute("inserting", "INSERT INTO public.owned VALUES (1)", &[])
            .await
            .unwrap();
        // Dropped without commit or rollback.
    }
    assert!(s.in_transaction());
    // The same owner's next statement runs after a rollback, not inside the old transaction.
    assert_eq!(
        scalar_i64(&mut s, "SELECT count(*) FROM public.owned").await,
        0
    );
    assert!(!s.in_transaction());

    // A failed statement makes commit roll back and say so, instead of a silent rollback.
    let mut tx = s.begin("a failing test").await.unwrap();
    tx.execute("inserting", "INSERT INTO public.owned VALUES (2)", &[])
        .await
        .unwrap();
    let bad = tx
        .execute("dividing", "SELECT 1 / 0", &[])
        .await
        .unwrap_err();
    assert!(bad.is_data(), "{bad}");
    let err = tx.commit().await.unwrap_err();
    assert!(err.to_string().contains("rolled back"), "{err}");
    assert!(!s.in_transaction());

    // A savepoint undoes one failed part; the rest commits.
    let mut tx = s.begin("a savepoint test").await.unwrap();
    tx.execute("inserting", "INSERT INTO public.owned VALUES (3)", &[])
        .await
        .unwrap();
    tx.savepoint("one").await.unwrap();
    tx.execute("dividing", "SELECT 1 / 0", &[])
        .await
        .unwrap_err();
    tx.rollback_to("one").await.unwrap();
    tx.commit().await.unwrap();
    drop(s);
    assert_eq!(stored(&bed).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_owner_never_waits_behind_an_open_transaction() {
    let bed = TestBed::start();
    let manager = setup(&bed).await;
    let mut first = manager.checkout().await.unwrap();

    let long = async {
        let mut tx = first.begin("a long delivery").await.unwrap();
        tx.execute("sleeping", "SELECT pg_sleep(5)", &[])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    };
    let quick = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let mut second = manager.checkout().await.unwrap();
        let one = scalar_i64(&mut second, "SELECT 1::bigint").await;
        (started.elapsed(), one)
    };
    let ((), (took, one)) = tokio::join!(long, quick);
    drop(first);
    eprintln!("second owner's statement during a 5 s transaction: {took:?}");
    assert_eq!(one, 1);
    assert!(
        took < Duration::from_secs(4),
        "the second owner waited for the transaction: {took:?}"
    );
    assert_eq!(
        manager.idle_sessions(),
        1,
        "one session is kept for reuse, the second closed"
    );
}
