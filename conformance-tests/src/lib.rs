//! The conformance suite every bgtask backend passes: the [`Broker`] contract, the task protocol
//! end to end, and faults injected with a TCP [`proxy::FaultProxy`].
//!
//! A backend runs the whole suite by writing one [`BrokerFactory`] and one macro call in an
//! integration test (which needs `tokio` with the `macros` and `rt-multi-thread` features):
//!
//! ```ignore
//! bgtask_conformance::conformance_suite!(MyFactory::new());
//! ```
//!
//! Every scenario becomes a `#[tokio::test]` of its own name, so failures show by name and
//! `cargo test <name>` filters. Each runs in a namespace of its own and cleans up by expiry; none
//! deletes anything it did not create. Scenarios that need something a backend declares it lacks
//! (see [`Capabilities`](bgtask_core::Capabilities)) check the declared behaviour instead, or say
//! on stderr that they do not apply (only the fault scenarios, for in-process brokers).
#![deny(missing_docs)]

mod harness;
pub mod proxy;
pub mod recorded;
pub mod scenarios;
pub mod servers;

use std::net::SocketAddr;

use async_trait::async_trait;
use bgtask_core::{DynBroker, Result};

pub use harness::{
    expect_message, expect_next, expect_silence, next_message, run, Harness, RawWorker,
    WorkerGuard, ARRIVES,
};

/// How the suite gets brokers of the backend under test. A backend writes one of these.
#[async_trait]
pub trait BrokerFactory: Send + Sync + 'static {
    /// A new broker connected to the test server. Panics with a message saying how to start the
    /// server when it cannot connect: a missing server fails the suite, it never passes it.
    async fn broker(&self) -> DynBroker;

    /// The server's address, which the fault proxy forwards to. The default, `None`, is for
    /// brokers no proxy can stand in front of: in-process ones, and cluster clients (which
    /// learn every node's address from the cluster and connect past a proxy); the fault
    /// scenarios then say they do not apply.
    fn server_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// A new broker that connects to `addr` (a fault proxy in front of the server) instead of the
    /// server itself, with short timeouts and reconnect backoff (about 1 s each) so outages are
    /// noticed quickly. Connect errors are returned, not panicked. Only called when
    /// `server_addr()` is `Some`; the default, for the factories where it is `None`, says so
    /// with an [`ErrorKind::Unsupported`](bgtask_core::ErrorKind::Unsupported) error.
    async fn broker_via(&self, _addr: SocketAddr) -> Result<DynBroker> {
        Err(bgtask_core::Error::new(
            bgtask_core::ErrorKind::Unsupported,
            "this factory's brokers cannot be reached through a proxy (server_addr is None)",
        ))
    }
}

/// Expand into one `#[tokio::test]` per scenario, each running against brokers from `$factory`
/// (an expression that builds a [`BrokerFactory`]).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::for_each_scenario!($crate::__conformance_test, $factory);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    ($factory:expr; $($module:ident :: $name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run(stringify!($name), $factory, $crate::scenarios::$module::$name).await;
            }
        )*
    };
}

/// Call `$callback!($arg; module::scenario, ...)` with every scenario of the suite: the one list
/// of scenarios, which the tests and the documentation both read.
#[macro_export]
macro_rules! for_each_scenario {
    ($callback:path, $arg:expr) => {
        $callback!($arg;
            broker::publish_reaches_every_subscriber,
            broker::publish_without_subscribers_is_declared,
            broker::subscription_is_active_on_return,
            broker::messages_arrive_in_order,
            broker::payloads_are_binary_safe,
            broker::one_mib_payload,
            broker::dropping_a_subscription_unsubscribes,
            broker::subscriptions_on_one_broker_share_a_channel,
            broker::channel_names_never_meet,
            broker::lease_cap_is_respected,
            broker::concurrent_acquires_respect_the_cap,
            broker::leases_expire_on_their_own,
            broker::each_lease_expires_individually,
            broker::release_frees_a_slot,
            broker::release_of_an_unknown_lease_is_false,
            broker::leases_list_notes_and_remaining_time,
            broker::lease_keys_never_meet,
            broker::uncapped_leases_count_up,
            broker::claims_are_exclusive_and_expire,
            admission::admit_caps_exactly_under_64_creators,
            admission::admit_refuses_a_blacklisted_value_without_a_slot,
            admission::admit_leases_release_and_expire,
            admission::a_chosen_lease_id_names_the_lease,
            admission::admit_and_publish_offers_only_when_granted,
            admission::admit_and_publish_caps_exactly_under_64_creators,
            admission::release_and_publish_frees_the_slot_before_delivery,
            admission::the_worker_frees_the_slot_with_its_reply,
            admission::the_creator_releases_unless_the_worker_did,
            listing::list_keys_pages_in_order,
            listing::keys_in_flight_lists_running_tasks,
            protocol::submit_and_reply,
            protocol::submit_returns_the_id_at_once,
            protocol::typed_call_round_trip,
            protocol::progress_arrives_in_order,
            protocol::worker_sees_metadata_and_key_before_accepting,
            protocol::first_accept_wins,
            protocol::thousand_tasks_ten_workers_exactly_once,
            protocol::ignored_task_times_out,
            protocol::zero_or_negative_timeout_means_default,
            protocol::per_task_timeout_overrides_default,
            protocol::late_reply_is_dropped,
            lifecycle::timed_out_task_is_cancelled_at_the_worker,
            protocol::error_status_is_a_typed_error,
            protocol::failed_status_is_a_typed_error,
            protocol::handler_panic_fails_the_task,
            protocol::dropped_running_task_fails_fast,
            protocol::broadcast_runs_on_every_worker,
            keys::per_key_limit_rejects_over_limit,
            keys::per_key_limit_frees_on_completion,
            keys::per_key_limit_frees_on_timeout,
            keys::unlimited_per_key_admits_all,
            keys::crashed_creator_leases_free_themselves,
            keys::task_without_its_key_is_rejected,
            keys::blacklist_after_threshold,
            keys::blacklist_lift,
            keys::blacklist_expires,
            keys::reports_at_threshold_do_not_blacklist,
            protocol::oversized_task_is_refused_before_publishing,
            protocol::oversized_reply_is_refused,
            protocol::one_mib_task_and_reply,
            protocol::no_worker_fails_fast,
            protocol::targeted_task_reaches_only_its_workers,
            lifecycle::cancel_is_observed_by_the_running_worker,
            lifecycle::cancel_before_accept_prevents_accept,
            lifecycle::worker_shutdown_drains_in_flight,
            lifecycle::client_shutdown_ends_pending_tasks,
            hostile::malformed_messages_do_not_stop_anyone,
            hostile::forged_reply_channel_is_refused,
            protocol::handler_concurrency_is_respected,
            hostile::namespaces_never_meet,
            hostile::invalid_names_are_rejected,
            protocol::huge_timeouts_are_capped,
            protocol::events_report_the_task_lifecycle,
            hostile::hostile_task_names_reach_only_their_workers,
            offers::an_offer_reaches_one_worker_only,
            offers::a_decline_goes_to_the_next_worker,
            offers::an_unanswered_offer_is_offered_again,
            offers::a_slow_worker_keeps_its_offers,
            offers::all_declines_are_a_clear_error,
            offers::presence_expires_after_a_crash,
            offers::a_joining_worker_gets_offers_within_a_second,
            offers::tasks_spread_evenly,
            offers::full_workers_hold_tasks_back,
            offers::presence_lists_workers_and_targets,
            offers::presence_counts_running_tasks_by_name,
            offers::hostile_presence_and_answers_are_ignored,
            faults::refused_connection_is_unavailable,
            faults::calls_are_bounded_in_a_black_hole,
            faults::every_call_is_bounded_while_cut_and_recovers,
            faults::no_task_call_waits_past_its_deadline,
            faults::subscription_resumes_after_outage,
            faults::subscription_resumes_after_20s_outage,
            faults::task_completes_after_outage,
            faults::outage_under_load_5s,
            faults::outage_under_load_30s,
            faults::black_hole_under_load,
        );
    };
}
