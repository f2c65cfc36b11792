//! Publishes task events to containerd, in order, from one thread, so a
//! slow containerd never blocks a task request and TaskExit never overtakes
//! TaskStart.

use std::sync::mpsc;

use containerd_shim::{
    protos::{protobuf::MessageDyn, ttrpc::context::Context},
    synchronous::publisher::RemotePublisher,
};

pub struct Event {
    pub topic: &'static str,
    pub message: Box<dyn MessageDyn>,
}

#[derive(Clone)]
pub struct EventSender {
    tx: Option<mpsc::Sender<Event>>,
}

impl EventSender {
    /// A sender that drops events (for the start/delete actions, which have
    /// no connection to containerd's event service).
    pub fn disconnected() -> Self {
        EventSender { tx: None }
    }

    pub fn start(publisher: RemotePublisher, namespace: String) -> Self {
        let (tx, rx) = mpsc::channel::<Event>();
        let spawned = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                for event in rx {
                    if let Err(e) = publisher.publish(
                        Context::default(),
                        event.topic,
                        &namespace,
                        event.message,
                    ) {
                        log::warn!("publishing {}: {e}", event.topic);
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the event publisher: {e}");
        }
        EventSender { tx: Some(tx) }
    }

    pub fn send(&self, topic: &'static str, message: Box<dyn MessageDyn>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Event { topic, message });
        }
    }
}
