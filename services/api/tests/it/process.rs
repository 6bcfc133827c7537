//! The `flashsale-api` binary as an operator runs it: SIGTERM ends it
//! gracefully with exit 0.

use flashsale_testkit as common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_api_with_exit_0() {
    let env = common::env().await;
    let (mut child, _) = super::api_process(&env).await;
    let status =
        flashsale_testkit::terminate(&mut child.0).expect("the API did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0));
    env.finish().await;
}
