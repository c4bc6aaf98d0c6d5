// RPC servers for models loaded through pyadaq's Python (pyadaq.Llama(rpc_servers=...)).
//
// ggml's RPC backend makes each server a device, registered for the whole process; llama.cpp's
// default device selection then puts every registered RPC device in front of the local GPUs of
// every model loaded afterwards. llama.cpp's tools register their --rpc servers once, so that is
// what they want. A Python process may load several models, each with its own servers or none:
// pyadaq_next_model_rpc_servers() registers the servers the next model on the calling thread
// uses, and pyadaq_model_devices() (called by llama.cpp's device selection, native/patches/0016)
// keeps, of the RPC devices registered here, those of that model's servers only. RPC devices
// registered by other means (a tool's --rpc) are left as upstream selects them.
#include "pyadaq-llama.h"
#include "pyadaq-quants.h"

#include "ggml-backend.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

extern "C" {

// Registers each server of `endpoints` (comma-separated host:port; registration happens once per
// server and process) and names them the servers of the next model loaded on the calling thread;
// endpoints == NULL or "" forgets a pending list. The caller must have checked that each server
// answers (ggml's RPC client aborts the process when it cannot connect). Returns the number of
// RPC devices the servers have, or -1 with the reason in err: no RPC backend in this build, an
// endpoint without a port, a server that reports no device.
PYADAQ_API int32_t pyadaq_next_model_rpc_servers(const char * endpoints, char * err, size_t err_size);

}

namespace pyadaq_rpc {

std::mutex g_rpc_mutex;
std::set<std::string> g_rpc_registered;             // servers registered through this file
thread_local std::vector<std::string> t_rpc_pending;  // the next model's servers on this thread

void set_error(char * err, size_t err_size, const std::string & msg) {
    if (err != nullptr && err_size > 0) {
        snprintf(err, err_size, "%s", msg.c_str());
    }
}

std::vector<std::string> split_endpoints(const char * s) {
    std::vector<std::string> out;
    std::string cur;
    for (const char * p = s; ; ++p) {
        if (*p == ',' || *p == '\0') {
            if (!cur.empty()) {
                out.push_back(cur);
            }
            cur.clear();
            if (*p == '\0') {
                break;
            }
        } else if (*p != ' ') {
            cur += *p;
        }
    }
    return out;
}

bool is_rpc(ggml_backend_dev_t dev) {
    return strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "RPC") == 0;
}

} // namespace pyadaq_rpc

using namespace pyadaq_rpc;

int32_t pyadaq_next_model_rpc_servers(const char * endpoints, char * err, size_t err_size) {
    t_rpc_pending.clear();
    if (endpoints == nullptr || *endpoints == '\0') {
        return 0;
    }
    const std::vector<std::string> servers = split_endpoints(endpoints);
    for (const auto & s : servers) {
        const size_t colon = s.rfind(':');
        if (colon == std::string::npos || colon + 1 == s.size()) {
            set_error(err, err_size, "RPC server '" + s + "' is not host:port");
            return -1;
        }
    }
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    if (rpc == nullptr) {
        set_error(err, err_size, "this build has no RPC backend (GGML_RPC=OFF)");
        return -1;
    }
    using add_server_t = ggml_backend_reg_t (*)(const char *);
    auto add_server = (add_server_t) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server");
    if (add_server == nullptr) {
        set_error(err, err_size, "the RPC backend has no ggml_backend_rpc_add_server");
        return -1;
    }
    int32_t n_dev = 0;
    std::lock_guard<std::mutex> lock(g_rpc_mutex);
    for (const auto & s : servers) {
        ggml_backend_reg_t reg = add_server(s.c_str());  // connects; cached per endpoint by ggml
        if (reg == nullptr) {
            set_error(err, err_size, "RPC server " + s + " reports no device");
            return -1;
        }
        if (g_rpc_registered.insert(s).second) {
            ggml_backend_register(reg);
        }
        n_dev += (int32_t) ggml_backend_reg_dev_count(reg);
    }
    t_rpc_pending = servers;
    return n_dev;
}

void pyadaq_model_devices(std::vector<llama_device> & devices) {
    std::vector<std::string> pending;
    pending.swap(t_rpc_pending);  // taken by this model load, whatever happens
    std::lock_guard<std::mutex> lock(g_rpc_mutex);
    if (g_rpc_registered.empty()) {
        return;
    }
    devices.erase(std::remove_if(devices.begin(), devices.end(), [&](const llama_device & d) {
        if (d.is_meta || !is_rpc(d.dev)) {
            return false;
        }
        const std::string endpoint = ggml_backend_dev_description(d.dev);  // ggml-rpc: the endpoint
        return g_rpc_registered.count(endpoint) != 0 &&
               std::find(pending.begin(), pending.end(), endpoint) == pending.end();
    }), devices.end());
}
