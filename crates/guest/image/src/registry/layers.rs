//! An image's config and layers: fetched in parallel, checked against
//! their digests, decrypted where encrypted.

use super::*;

impl RegistryClient {
    /// Manifest, config and every layer of `image`.
    pub fn pull(&mut self, image: &ImageReference) -> Result<PulledImage, RegistryError> {
        let (manifest_digest, manifest) = self.manifest(image)?;
        self.fetch(image, manifest_digest, &manifest)
    }

    /// Config and layers of a manifest [`RegistryClient::manifest`] returned.
    pub fn fetch(
        &mut self,
        image: &ImageReference,
        manifest_digest: String,
        manifest: &serde_json::Value,
    ) -> Result<PulledImage, RegistryError> {
        let (config, descriptors) = self.fetch_config(image, manifest)?;
        let blobs = self.fetch_layers(image, &descriptors)?;
        Ok(PulledImage {
            manifest_digest,
            config,
            layers: descriptors.into_iter().zip(blobs).collect(),
        })
    }

    /// The config blob and the layer descriptors of a manifest (no layer is
    /// fetched).
    pub fn fetch_config(
        &mut self,
        image: &ImageReference,
        manifest: &serde_json::Value,
    ) -> Result<(Vec<u8>, Vec<LayerDescriptor>), RegistryError> {
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| RegistryError::Manifest("the manifest has no config".into()))?
            .to_string();
        let config = self.blob(image, &config_digest, "config", MAX_MANIFEST_BYTES, None)?;
        let descriptors = manifest["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|layer| {
                serde_json::from_value::<LayerDescriptor>(layer)
                    .map_err(|e| RegistryError::Manifest(format!("a layer descriptor: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((config, descriptors))
    }

    /// Hands each layer blob to `consume` in order while later ones are
    /// fetched: up to [`PARALLEL_LAYER_FETCHES`] downloads at once, and no
    /// fetch runs further than that ahead of `consume`, so at most that many
    /// blobs (plus the one being consumed) are in memory, not the whole
    /// image. Stops at the first error of either side.
    pub fn for_each_layer<E>(
        &mut self,
        image: &ImageReference,
        descriptors: &[LayerDescriptor],
        mut consume: impl FnMut(usize, Vec<u8>) -> Result<(), E>,
        fetch_error: impl Fn(RegistryError) -> E,
    ) -> Result<(), E> {
        let n = descriptors.len();
        let window = FetchWindow::new(n);
        std::thread::scope(|scope| {
            for _ in 0..PARALLEL_LAYER_FETCHES.min(n) {
                // Clones share the connection pool and the tokens so far.
                let mut client = self.clone();
                let window = &window;
                scope.spawn(move || {
                    while let Some(i) = window.claim() {
                        // The manifest's size bounds what the registry may send.
                        let size = Some(descriptors[i].size).filter(|&s| s > 0);
                        let limit = size.map_or(MAX_BLOB_BYTES, |s| s.min(MAX_BLOB_BYTES));
                        let blob = client.blob(image, &descriptors[i].digest, "layer", limit, size);
                        window.deliver(i, blob);
                    }
                });
            }
            let result = (0..n).try_for_each(|i| {
                let blob = window.take(i).map_err(&fetch_error)?;
                consume(i, blob)
            });
            window.stop();
            result
        })
    }

    /// Layer blobs, up to [`PARALLEL_LAYER_FETCHES`] at a time, in order
    /// (all of them in memory: for host tools; the guest pull streams).
    fn fetch_layers(
        &mut self,
        image: &ImageReference,
        descriptors: &[LayerDescriptor],
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        let mut blobs = Vec::with_capacity(descriptors.len());
        self.for_each_layer(
            image,
            descriptors,
            |_, blob| {
                blobs.push(blob);
                Ok(())
            },
            |e| e,
        )?;
        Ok(blobs)
    }
}

/// A layer ready to unpack: decrypted where it was encrypted.
#[derive(Debug)]
pub struct PlainLayer {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl PlainLayer {
    /// The pulled `blob` of `descriptor`, decrypted in place with `keys` if
    /// it is encrypted (HMAC and digest checked).
    pub fn new(
        descriptor: LayerDescriptor,
        blob: Vec<u8>,
        keys: &[kabuto_jose::TeeKeyPair],
    ) -> Result<PlainLayer, crate::ocicrypt::DecryptError> {
        Ok(if descriptor.is_encrypted() {
            PlainLayer {
                media_type: descriptor.decrypted_media_type().to_string(),
                data: crate::ocicrypt::decrypt_layer(&descriptor, blob, keys)?,
                digest: descriptor.digest,
            }
        } else {
            PlainLayer {
                media_type: descriptor.media_type,
                digest: descriptor.digest,
                data: blob,
            }
        })
    }

    pub fn as_layer(&self) -> crate::unpack::Layer<'_> {
        crate::unpack::Layer {
            digest: &self.digest,
            media_type: &self.media_type,
            data: &self.data,
        }
    }
}

impl PulledImage {
    /// The layers in order, encrypted ones decrypted with `keys` (HMAC and
    /// digest checked); a plain layer is taken as pulled.
    pub fn plain_layers(
        self,
        keys: &[kabuto_jose::TeeKeyPair],
    ) -> Result<Vec<PlainLayer>, crate::ocicrypt::DecryptError> {
        self.layers
            .into_iter()
            .map(|(descriptor, blob)| PlainLayer::new(descriptor, blob, keys))
            .collect()
    }
}

/// The fetch window of [`RegistryClient::for_each_layer`]: which layer is
/// fetched next, how many are in flight, and the fetched blobs not yet
/// consumed (at most [`PARALLEL_LAYER_FETCHES`] ahead of the consumer).
struct FetchWindow {
    state: std::sync::Mutex<Window>,
    changed: std::sync::Condvar,
    layers: usize,
}

struct Window {
    next_to_fetch: usize,
    consumed: usize,
    in_flight: usize,
    stop: bool,
    slots: Vec<Option<Result<Vec<u8>, RegistryError>>>,
}

impl FetchWindow {
    fn new(layers: usize) -> FetchWindow {
        FetchWindow {
            state: std::sync::Mutex::new(Window {
                next_to_fetch: 0,
                consumed: 0,
                in_flight: 0,
                stop: false,
                slots: (0..layers).map(|_| None).collect(),
            }),
            changed: std::sync::Condvar::new(),
            layers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        guard: std::sync::MutexGuard<'a, Window>,
    ) -> std::sync::MutexGuard<'a, Window> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// The next layer to fetch, once the window has room; `None` when all
    /// are claimed or fetching stopped.
    fn claim(&self) -> Option<usize> {
        let mut w = self.lock();
        while !w.stop
            && w.next_to_fetch < self.layers
            && w.next_to_fetch >= w.consumed + PARALLEL_LAYER_FETCHES
        {
            w = self.wait(w);
        }
        if w.stop || w.next_to_fetch >= self.layers {
            return None;
        }
        w.next_to_fetch += 1;
        w.in_flight += 1;
        Some(w.next_to_fetch - 1)
    }

    /// Layer `i` arrived (or failed, which stops all fetching).
    fn deliver(&self, i: usize, blob: Result<Vec<u8>, RegistryError>) {
        let mut w = self.lock();
        w.in_flight -= 1;
        w.stop |= blob.is_err();
        w.slots[i] = Some(blob);
        self.changed.notify_all();
    }

    /// Layer `i`'s blob, waiting for it; the first fetch error when
    /// fetching stopped before it arrived.
    fn take(&self, i: usize) -> Result<Vec<u8>, RegistryError> {
        let mut w = self.lock();
        while w.slots[i].is_none() && !(w.stop && w.in_flight == 0) {
            w = self.wait(w);
        }
        match w.slots[i].take() {
            Some(Ok(blob)) => {
                w.consumed = i + 1;
                self.changed.notify_all();
                Ok(blob)
            }
            Some(Err(e)) => Err(e),
            // Stopped by a failed fetch of a later layer.
            None => Err(w
                .slots
                .iter_mut()
                .find_map(|s| match s.take() {
                    Some(Err(e)) => Some(e),
                    _ => None,
                })
                .unwrap_or_else(|| RegistryError::Manifest("a layer was not fetched".into()))),
        }
    }

    /// No more fetching: the consumer is done or failed.
    fn stop(&self) {
        let mut w = self.lock();
        w.stop = true;
        self.changed.notify_all();
    }
}
