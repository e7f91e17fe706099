// Python module jax_ep._jax_ep_nvshmem: the NVSHMEM transport (jax_ep/_bootstrap.py drives it)
// and the internode kernels' FFI handlers (internode/; jax_ep/_ffi.py registers them and binds
// them to the main extension's workspaces). Loading it needs libnvshmem_host.so.3 (the pip
// package nvidia-nvshmem-cu13), which the Python side preloads; without it jax_ep still works,
// one process at a time.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>

#include <nanobind/stl/string.h>

#include "../internode/internode.h"
#include "../internode/internode_handlers.h"
#include "nvshmem_transport.h"

namespace nb = nanobind;

namespace {

void Check(int status, const char* error) {
  if (status != 0) throw std::runtime_error(error);
}

}  // namespace

NB_MODULE(_jax_ep_nvshmem, m) {
  m.doc() = "jax_ep's NVSHMEM transport: bootstrap and the peer mapping of its workspaces";
  m.def("version", [] { return std::string(JaxEpNvshmemVersion()); },
        "NVSHMEM version this module was built against.");
  m.def(
      "unique_id",
      [] {
        std::string id(JaxEpNvshmemUniqueIdBytes(), '\0');
        char error[512] = {0};
        Check(JaxEpNvshmemUniqueId(id.data(), error, sizeof(error)), error);
        return nb::bytes(id.data(), id.size());
      },
      "A fresh NVSHMEM unique ID (on process 0), to send to every process.");
  m.def(
      "init",
      [](nb::bytes unique_id, int pe, int num_pes, int device) {
        if (unique_id.size() != JaxEpNvshmemUniqueIdBytes()) {
          throw std::invalid_argument("jax_ep: an NVSHMEM unique ID has " +
                                      std::to_string(JaxEpNvshmemUniqueIdBytes()) +
                                      " bytes, got " + std::to_string(unique_id.size()));
        }
        char error[512] = {0};
        int status;
        {
          nb::gil_scoped_release release;  // waits for every other process
          status = JaxEpNvshmemInit(unique_id.c_str(), pe, num_pes, device, error, sizeof(error));
        }
        Check(status, error);
      },
      nb::arg("unique_id"), nb::arg("pe"), nb::arg("num_pes"), nb::arg("device"),
      "Collective: initialise NVSHMEM as PE `pe` of `num_pes` on CUDA device `device`.");
  m.def(
      "handshake",
      [](double timeout_s) {
        char error[512] = {0};
        int status;
        {
          nb::gil_scoped_release release;
          status = JaxEpNvshmemHandshake(uint64_t(timeout_s * 1e9), error, sizeof(error));
        }
        Check(status, error);
      },
      nb::arg("timeout_s"),
      "Collective, after every PE initialised: a device put+signal ring over all PEs.");
  m.def(
      "state",
      []() -> nb::object {
        const JaxEpPeerMappingOps* ops = JaxEpNvshmemMapping();
        if (ops == nullptr) return nb::none();
        return nb::make_tuple(ops->device, ops->my_pe, ops->num_pes);
      },
      "(device, pe, num_pes) once initialised, else None.");
  m.def(
      "registrations",
      [] {
        nb::dict targets;
        targets["jax_ep_internode_dispatch"] = nb::capsule(jax_ep::InternodeDispatchHandler());
        targets["jax_ep_internode_combine"] = nb::capsule(jax_ep::InternodeReturnHandler());
        targets["jax_ep_internode_broadcast"] = nb::capsule(jax_ep::InternodeBroadcastHandler());
        return targets;
      },
      "dict {FFI target name: PyCapsule of its handler} of the internode ops.");
  m.def(
      "bind_workspace_api",
      [](nb::capsule api) {
        const char* name = api.name();
        if (name == nullptr || std::string(name) != jax_ep::kWorkspaceApiCapsule) {
          throw std::invalid_argument("jax_ep: expected a jax_ep.WorkspaceApi capsule");
        }
        const auto* table = static_cast<const JaxEpWorkspaceApi*>(api.data());
        if (table->abi_version != jax_ep::kWorkspaceApiAbi ||
            table->view_size != sizeof(JaxEpWorkspaceView)) {
          throw std::runtime_error("jax_ep: the main extension's workspace table does not match "
                                   "this NVSHMEM extension (rebuild jax_ep)");
        }
        jax_ep::BindWorkspaceApi(table);
      },
      nb::arg("api"), "Binds the internode handlers to jax_ep._jax_ep_cuda.workspace_api().");
  m.def(
      "preload",
      [](int device) {
        int saved = 0;
        cudaGetDevice(&saved);
        cudaError_t err = cudaSetDevice(device);
        if (err == cudaSuccess) err = jax_ep::PreloadInternodeKernels();
        cudaSetDevice(saved);
        if (err != cudaSuccess) {
          throw std::runtime_error("jax_ep: loading the internode kernels on GPU " +
                                   std::to_string(device) + ": " + cudaGetErrorString(err));
        }
      },
      nb::arg("device"), "Load the internode kernels on CUDA device `device` now (not lazily).");
  m.def(
      "mapping",
      [] {
        const JaxEpPeerMappingOps* ops = JaxEpNvshmemMapping();
        if (ops == nullptr) throw std::runtime_error("jax_ep: NVSHMEM is not initialised");
        return nb::capsule(ops, jax_ep::kPeerMappingCapsule);
      },
      "The peer-mapping table (a PyCapsule) for jax_ep._jax_ep_cuda.create_workspace.");
}
