// edgead: host-only harness for the PadimMahalanobis TensorRT plugin (no TensorRT library, no GPU).
//
// Compiled with g++ against one TensorRT header folder (8.5 / 8.6: IPluginV2DynamicExt; 10.x / 11.x: IPluginV3)
// together with plugin/padim_mahalanobis_plugin.cpp. The plugin registry (getPluginRegistry) and the kernel
// (edgead_padim_mahalanobis) are stubbed here; everything else is the real plugin code, driven the way TensorRT
// drives it:
//   - REGISTER_TENSORRT_PLUGIN registers exactly one creator "PadimMahalanobis" v1 in namespace "";
//   - plugin fields are built from node attributes the way the ONNX parser's fallback importer builds them
//     (onnx-tensorrt loadFields: an INT attribute -> one kINT32; a STRING -> kCHAR with a trailing NUL counted);
//   - 8.x: createPlugin -> configurePlugin -> initialize -> serialize -> deserializePlugin -> clone -> enqueue;
//     10.x/11.x: createPlugin(kBUILD) -> configurePlugin -> getFieldsToSerialize -> createPlugin(kRUNTIME) ->
//     attachToContext -> onShapeChange -> enqueue;
//   - format combinations, output shapes/types, shape and type rejection, and the exact arguments enqueue passes
//     to the kernel.
// Prints one line per failed check and a summary; the exit status is the number of failures (0 = all good).
// Run through cpp_bindings/tests/run_plugin_harness.sh or tests/test_plugin_harness.py.
#include <NvInfer.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "edgead/padim_mahalanobis.h"
#include "padim_mahalanobis_plugin.h"

using namespace nvinfer1;

// ------------------------------------------------------------------------------------------------- checks

static int g_checks = 0;
static int g_failures = 0;

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        ++g_checks;                                                                          \
        if (!(cond)) {                                                                       \
            ++g_failures;                                                                    \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                      \
        }                                                                                    \
    } while (0)

// ------------------------------------------------------------------------------------------------- kernel stub

struct KernelCall {
    int calls{0};
    float const* x{nullptr};
    float const* mean{nullptr};
    void const* w{nullptr};
    int wIsHalf{-1};
    float* out{nullptr};
    int n{0}, d{0}, p{0};
    cudaStream_t stream{nullptr};
};
static KernelCall g_call;
static int g_kernelStatus = EDGEAD_OK;

extern "C" int edgead_padim_mahalanobis(float const* x, float const* mean, void const* w_packed, int w_is_half,
                                        float* out, int N, int D, int P, cudaStream_t stream) {
    ++g_call.calls;
    g_call.x = x;
    g_call.mean = mean;
    g_call.w = w_packed;
    g_call.wIsHalf = w_is_half;
    g_call.out = out;
    g_call.n = N;
    g_call.d = D;
    g_call.p = P;
    g_call.stream = stream;
    return g_kernelStatus;
}

extern "C" char const* edgead_status_string(int) { return "stubbed kernel error"; }

// ------------------------------------------------------------------------------------------------- registry stub

#if EDGEAD_TRT_V3
using CreatorBase = IPluginCreatorInterface;
#else
using CreatorBase = IPluginCreator;
#endif

struct Registered {
    CreatorBase* creator;
    std::string ns;
};
static std::vector<Registered> g_registered;

class FakeRegistry : public IPluginRegistry {
public:
#if NV_TENSORRT_MAJOR < 11
    bool registerCreator(IPluginCreator& creator, AsciiChar const* const ns) noexcept override {
#if EDGEAD_TRT_V3
        (void)creator;
        (void)ns;
        std::printf("FAIL registry: a TensorRT >= 10 plugin registered an IPluginCreator (V2 interface)\n");
        ++g_failures;
#else
        g_registered.push_back({&creator, ns != nullptr ? ns : "<null>"});
#endif
        return true;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const,
                                     AsciiChar const* const) noexcept override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
#endif
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
#if NV_TENSORRT_MAJOR > 8 || (NV_TENSORRT_MAJOR == 8 && NV_TENSORRT_MINOR >= 6)
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
#endif
#if EDGEAD_TRT_V3
    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
        g_registered.push_back({&creator, ns != nullptr ? ns : "<null>"});
        return true;
    }
    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
        *n = 0;
        return nullptr;
    }
    IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const,
                                        AsciiChar const* const) noexcept override {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
#if NV_TENSORRT_MAJOR >= 11 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 6)
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override {
        *n = 0;
        return nullptr;
    }
#endif
#endif
};

extern "C" IPluginRegistry* getPluginRegistry() noexcept {
    static FakeRegistry registry;
    return &registry;
}

// ------------------------------------------------------------------------------------------------- the parser

//! One ONNX node attribute: an INT, INTS or STRING.
struct Attr {
    enum Kind { kInt, kInts, kString } kind;
    std::vector<int32_t> ints;
    std::string text;
    static Attr integer(int32_t v) { return Attr{kInt, {v}, ""}; }
    static Attr integers(std::vector<int32_t> v) { return Attr{kInts, v, ""}; }
    static Attr string(std::string s) { return Attr{kString, {}, s}; }
};
using Node = std::map<std::string, Attr>;

//! PluginFields as onnx-tensorrt's loadFields builds them: only the creator's field names that the node has,
//! in the creator's order; the field type follows the attribute type. `storage` keeps the data alive.
struct ParsedFields {
    std::vector<std::vector<uint8_t>> storage;
    std::vector<std::string> names;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};
};

static void parseNode(Node const& node, PluginFieldCollection const* fieldNames, ParsedFields& out) {
    out.storage.clear();
    out.names.clear();
    out.fields.clear();
    out.storage.reserve(fieldNames->nbFields);
    out.names.reserve(fieldNames->nbFields);
    for (int32_t i = 0; i < fieldNames->nbFields; ++i) {
        auto it = node.find(fieldNames->fields[i].name);
        if (it == node.end()) continue;
        Attr const& attr = it->second;
        out.names.push_back(it->first);
        std::vector<uint8_t> bytes;
        PluginFieldType type;
        int32_t length;
        if (attr.kind == Attr::kString) {
            bytes.assign(attr.text.begin(), attr.text.end());
            bytes.push_back('\0');
            type = PluginFieldType::kCHAR;
            length = static_cast<int32_t>(bytes.size());
        } else {
            bytes.resize(attr.ints.size() * sizeof(int32_t));
            std::memcpy(bytes.data(), attr.ints.data(), bytes.size());
            type = PluginFieldType::kINT32;
            length = static_cast<int32_t>(attr.ints.size());
        }
        out.storage.push_back(bytes);
        out.fields.emplace_back(out.names.back().c_str(), out.storage.back().data(), type, length);
    }
    out.collection.nbFields = static_cast<int32_t>(out.fields.size());
    out.collection.fields = out.fields.data();
}

//! The attributes edgead's exporter writes (exporters/onnx_head.py::mahalanobis_plugin).
static Node exportedNode(int32_t dim, int32_t patches, int32_t dtype) {
    return Node{{"plugin_version", Attr::string("1")},
                {"plugin_namespace", Attr::string("")},
                {"dim", Attr::integer(dim)},
                {"num_patches", Attr::integer(patches)},
                {"whitening_dtype", Attr::integer(dtype)}};
}

// ------------------------------------------------------------------------------------------------- tensors

static Dims dims(std::vector<int64_t> values) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    using Extent = std::remove_reference<decltype(d.d[0])>::type;  // int32_t on 8.x, int64_t on 10.x+
    for (size_t i = 0; i < values.size(); ++i) d.d[i] = static_cast<Extent>(values[i]);
    return d;
}

static PluginTensorDesc desc(std::vector<int64_t> shape, DataType type, TensorFormat format = TensorFormat::kLINEAR) {
    PluginTensorDesc t{};
    t.dims = dims(shape);
    t.type = type;
    t.format = format;
    t.scale = 1.f;
    return t;
}

static DynamicPluginTensorDesc dynDesc(PluginTensorDesc const& t) {
    DynamicPluginTensorDesc d{};
    d.desc = t;
    d.min = t.dims;
    d.max = t.dims;
    return d;
}

//! Run-time descriptors of one call: inputs (x [N,D,P], mean [P,D], w [P,T]) and output [N,P].
struct Io {
    PluginTensorDesc in[3];
    PluginTensorDesc out[1];
};

static Io io(int64_t n, int64_t d, int64_t p, DataType wType) {
    int64_t const tri = d * (d + 1) / 2;
    return Io{{desc({n, d, p}, DataType::kFLOAT), desc({p, d}, DataType::kFLOAT), desc({p, tri}, wType)},
              {desc({n, p}, DataType::kFLOAT)}};
}

static float const* const kX = reinterpret_cast<float const*>(0x1000);
static float const* const kMean = reinterpret_cast<float const*>(0x2000);
static void const* const kW = reinterpret_cast<void const*>(0x3000);
static float* const kOut = reinterpret_cast<float*>(0x4000);
static cudaStream_t const kStream = reinterpret_cast<cudaStream_t>(0x5000);
static void const* const kInputs[3] = {kX, kMean, kW};
static void* const kOutputs[1] = {kOut};

static DataType typeOf(int32_t onnxDtype) { return onnxDtype == 10 ? DataType::kHALF : DataType::kFLOAT; }
static DataType otherType(int32_t onnxDtype) { return onnxDtype == 10 ? DataType::kFLOAT : DataType::kHALF; }

//! The kernel call of the last enqueue matches (N, D, P, dtype) and the pointers TensorRT gave.
static bool kernelGot(int n, int d, int p, int32_t dtype) {
    return g_call.x == kX && g_call.mean == kMean && g_call.w == kW && g_call.out == kOut && g_call.stream == kStream &&
           g_call.n == n && g_call.d == d && g_call.p == p && g_call.wIsHalf == (dtype == 10 ? 1 : 0);
}

// ------------------------------------------------------------------------------------------------- interface glue

#if EDGEAD_TRT_V3
using Creator = IPluginCreatorV3One;
using Plugin = IPluginV3;

static IPluginV3OneCore* core(Plugin* p) {
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
static IPluginV3OneBuild* build(Plugin* p) {
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
static IPluginV3OneRuntime* runtime(Plugin* p) {
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}
static Plugin* create(Creator* c, PluginFieldCollection const* fc, TensorRTPhase phase = TensorRTPhase::kBUILD) {
    return c->createPlugin("node", fc, phase);
}
static void destroy(Plugin* p) { delete p; }

//! Build-time configuration; 0 = accepted.
static int32_t configure(Plugin* p, Io const& t) {
    DynamicPluginTensorDesc in[3] = {dynDesc(t.in[0]), dynDesc(t.in[1]), dynDesc(t.in[2])};
    DynamicPluginTensorDesc out[1] = {dynDesc(t.out[0])};
    return build(p)->configurePlugin(in, 3, out, 1);
}
static bool supports(Plugin* p, int32_t pos, Io const& t) {
    DynamicPluginTensorDesc inOut[4] = {dynDesc(t.in[0]), dynDesc(t.in[1]), dynDesc(t.in[2]), dynDesc(t.out[0])};
    return build(p)->supportsFormatCombination(pos, inOut, 3, 1);
}
static int32_t enqueue(Plugin* p, Io const& t) {
    return runtime(p)->enqueue(t.in, t.out, kInputs, kOutputs, nullptr, kStream);
}
#else
using Creator = IPluginCreator;
using Plugin = IPluginV2DynamicExt;

static Plugin* create(Creator* c, PluginFieldCollection const* fc) {
    return static_cast<Plugin*>(c->createPlugin("node", fc));
}
static void destroy(Plugin* p) { p->destroy(); }

//! Build-time configuration; 0 = accepted (configurePlugin cannot fail on 8.x: initialize() reports it).
static int32_t configure(Plugin* p, Io const& t) {
    DynamicPluginTensorDesc in[3] = {dynDesc(t.in[0]), dynDesc(t.in[1]), dynDesc(t.in[2])};
    DynamicPluginTensorDesc out[1] = {dynDesc(t.out[0])};
    p->configurePlugin(in, 3, out, 1);
    return p->initialize();
}
static bool supports(Plugin* p, int32_t pos, Io const& t) {
    PluginTensorDesc inOut[4] = {t.in[0], t.in[1], t.in[2], t.out[0]};
    return p->supportsFormatCombination(pos, inOut, 3, 1);
}
static int32_t enqueue(Plugin* p, Io const& t) { return p->enqueue(t.in, t.out, kInputs, kOutputs, nullptr, kStream); }
#endif

static Creator* theCreator() {
    if (g_registered.size() != 1) return nullptr;
#if EDGEAD_TRT_V3
    CreatorBase* base = g_registered[0].creator;
    if (std::strcmp(base->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) return nullptr;
    return static_cast<Creator*>(base);
#else
    return g_registered[0].creator;
#endif
}

static Plugin* fromNode(Creator* c, Node const& node) {
    ParsedFields parsed;
    parseNode(node, c->getFieldNames(), parsed);
    return create(c, &parsed.collection);
}

// ------------------------------------------------------------------------------------------------- the checks

static void checkRegistration() {
    CHECK(g_registered.size() == 1);
    Creator* c = theCreator();
    CHECK(c != nullptr);
    if (c == nullptr) return;
    CHECK(g_registered[0].ns == "");
    CHECK(std::strcmp(c->getPluginName(), "PadimMahalanobis") == 0);
    CHECK(std::strcmp(c->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(c->getPluginNamespace(), "") == 0);
    PluginFieldCollection const* names = c->getFieldNames();
    std::vector<std::string> listed;
    for (int32_t i = 0; i < names->nbFields; ++i) listed.push_back(names->fields[i].name);
    CHECK((listed == std::vector<std::string>{"plugin_version", "dim", "num_patches", "whitening_dtype"}));
}

static void checkFieldParsing(Creator* c) {
    for (int32_t dtype : {1, 10}) {
        Plugin* p = fromNode(c, exportedNode(24, 4, dtype));
        CHECK(p != nullptr);
        if (p != nullptr) destroy(p);
    }
    Node missing = exportedNode(24, 4, 10);
    missing.erase("whitening_dtype");
    CHECK(fromNode(c, missing) == nullptr);                       // old exports: refuse, do not guess the dtype
    CHECK(fromNode(c, exportedNode(24, 4, 3)) == nullptr);        // not float / float16
    CHECK(fromNode(c, exportedNode(24, 0, 10)) == nullptr);       // no patches
    CHECK(fromNode(c, exportedNode(0, 4, 10)) == nullptr);        // no dims
    CHECK(fromNode(c, exportedNode(EDGEAD_MAX_DIM + 1, 4, 10)) == nullptr);
    Plugin* largest = fromNode(c, exportedNode(EDGEAD_MAX_DIM, 4, 10));
    CHECK(largest != nullptr);
    if (largest != nullptr) destroy(largest);
    CHECK(EDGEAD_MAX_DIM == 12280);                               // (D + 8) * 4 bytes <= 48 KiB of shared memory
    Node version2 = exportedNode(24, 4, 10);
    version2["plugin_version"] = Attr::string("2");
    CHECK(fromNode(c, version2) == nullptr);
    Node dimAsString = exportedNode(24, 4, 10);
    dimAsString["dim"] = Attr::string("24");
    CHECK(fromNode(c, dimAsString) == nullptr);
    Node dimAsInts = exportedNode(24, 4, 10);
    dimAsInts["dim"] = Attr::integers({24, 24});
    CHECK(fromNode(c, dimAsInts) == nullptr);
    CHECK(create(c, nullptr) == nullptr);
}

static void checkFormats(Creator* c) {
    for (int32_t dtype : {1, 10}) {
        Plugin* p = fromNode(c, exportedNode(24, 4, dtype));
        if (p == nullptr) {
            CHECK(p != nullptr);
            continue;
        }
        Io good = io(2, 24, 4, typeOf(dtype));
        for (int32_t pos = 0; pos < 4; ++pos) CHECK(supports(p, pos, good));
        Io widened = io(2, 24, 4, otherType(dtype));  // statistics in the other precision: never
        CHECK(!supports(p, 2, widened));
        for (int32_t pos : {0, 1, 3}) {
            Io half = good;
            (pos == 3 ? half.out[0] : half.in[pos]).type = DataType::kHALF;
            CHECK(!supports(p, pos, half));
            Io int8 = good;
            (pos == 3 ? int8.out[0] : int8.in[pos]).type = DataType::kINT8;
            CHECK(!supports(p, pos, int8));
        }
        for (int32_t pos = 0; pos < 4; ++pos) {
            Io chw = good;
            (pos == 3 ? chw.out[0] : chw.in[pos < 3 ? pos : 0]).format = TensorFormat::kCHW32;
            CHECK(!supports(p, pos, chw));
        }
        destroy(p);
    }
}

static void checkOutputs(Creator* c) {
    Plugin* p = fromNode(c, exportedNode(24, 4, 10));
    if (p == nullptr) {
        CHECK(p != nullptr);
        return;
    }
    IDimensionExpr const* n = reinterpret_cast<IDimensionExpr const*>(0x10);
    IDimensionExpr const* d = reinterpret_cast<IDimensionExpr const*>(0x20);
    IDimensionExpr const* pp = reinterpret_cast<IDimensionExpr const*>(0x30);
    DimsExprs in[3]{};
    in[0].nbDims = 3;
    in[0].d[0] = n;
    in[0].d[1] = d;
    in[0].d[2] = pp;
    in[1].nbDims = 2;
    in[2].nbDims = 2;
    // getOutputShapes/getOutputDimensions only copy input expressions: the builder is never called
    alignas(IExprBuilder) static unsigned char builderStorage[sizeof(IExprBuilder)];
    IExprBuilder* exprs = reinterpret_cast<IExprBuilder*>(builderStorage);
#if EDGEAD_TRT_V3
    DimsExprs out[1]{};
    CHECK(build(p)->getOutputShapes(in, 3, nullptr, 0, out, 1, *exprs) == 0);
    DataType outType = DataType::kHALF;
    DataType inTypes[3] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kHALF};
    CHECK(build(p)->getOutputDataTypes(&outType, 1, inTypes, 3) == 0);
    CHECK(outType == DataType::kFLOAT);
    CHECK(build(p)->getNbOutputs() == 1);
    DimsExprs bad[3]{};
    bad[0].nbDims = 2;
    CHECK(build(p)->getOutputShapes(bad, 3, nullptr, 0, out, 1, *exprs) != 0);
    CHECK(std::strcmp(core(p)->getPluginName(), "PadimMahalanobis") == 0);
#else
    DimsExprs o = p->getOutputDimensions(0, in, 3, *exprs);
    DimsExprs out[1] = {o};
    DataType inTypes[3] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kHALF};
    CHECK(p->getOutputDataType(0, inTypes, 3) == DataType::kFLOAT);
    CHECK(p->getNbOutputs() == 1);
    CHECK(std::strcmp(p->getPluginType(), "PadimMahalanobis") == 0);
#endif
    CHECK(out[0].nbDims == 2 && out[0].d[0] == n && out[0].d[1] == pp);
    destroy(p);
}

//! Shapes that do not match the node are refused at build time, and enqueue never reaches the kernel.
static void checkShapeRejection(Creator* c) {
    for (int32_t dtype : {1, 10}) {
        DataType w = typeOf(dtype);
        Plugin* p = fromNode(c, exportedNode(24, 4, dtype));
        if (p == nullptr) {
            CHECK(p != nullptr);
            continue;
        }
        Io dynamicBatch = io(-1, 24, 4, w);
        CHECK(configure(p, dynamicBatch) == 0);
        destroy(p);

        Io wrongMean = io(2, 24, 4, w);
        wrongMean.in[1] = desc({4, 23}, DataType::kFLOAT);
        Io wrongW = io(2, 24, 4, w);
        wrongW.in[2] = desc({4, 24 * 25 / 2 - 1}, w);  // one entry short per patch: out-of-bounds reads before
        Io wrongX = io(2, 24, 5, w);
        Io wrongRank = io(2, 24, 4, w);
        wrongRank.in[0] = desc({2, 24 * 4}, DataType::kFLOAT);
        for (Io const* bad : {&wrongMean, &wrongW, &wrongX, &wrongRank}) {
            Plugin* q = fromNode(c, exportedNode(24, 4, dtype));
            if (q == nullptr) {
                CHECK(q != nullptr);
                continue;
            }
            CHECK(configure(q, *bad) != 0);
            int const before = g_call.calls;
            CHECK(enqueue(q, *bad) != 0);
            CHECK(g_call.calls == before);
            destroy(q);
        }
    }
}

//! enqueue passes exactly the node's D, P, dtype and TensorRT's pointers/stream; refuses what does not match.
static void checkEnqueue(Plugin* p, int32_t dtype, char const* stage) {
    DataType w = typeOf(dtype);
    for (int64_t n : {1, 3, 9}) {
        g_call = KernelCall{};
        int32_t const status = enqueue(p, io(n, 24, 4, w));
        CHECK(status == 0);
        CHECK(g_call.calls == 1);
        CHECK(kernelGot(static_cast<int>(n), 24, 4, dtype));
        if (status != 0 || !kernelGot(static_cast<int>(n), 24, 4, dtype)) std::printf("  (at %s, N=%d)\n", stage, (int)n);
    }
    g_call = KernelCall{};
    CHECK(enqueue(p, io(0, 24, 4, w)) == 0);  // empty batch: nothing to launch
    CHECK(g_call.calls == 0);
    CHECK(enqueue(p, io(2, 25, 4, w)) != 0);  // D differs from the node
    CHECK(enqueue(p, io(2, 24, 8, w)) != 0);  // P differs from the node
    CHECK(enqueue(p, io(2, 24, 4, otherType(dtype))) != 0);  // statistics in the other precision
    Io halfX = io(2, 24, 4, w);
    halfX.in[0].type = DataType::kHALF;
    CHECK(enqueue(p, halfX) != 0);
    Io badOut = io(2, 24, 4, w);
    badOut.out[0] = desc({2, 5}, DataType::kFLOAT);
    CHECK(enqueue(p, badOut) != 0);
    CHECK(g_call.calls == 0);
    g_kernelStatus = EDGEAD_ERR_CUDA;  // a failed launch is reported to TensorRT
    CHECK(enqueue(p, io(2, 24, 4, w)) != 0);
    g_kernelStatus = EDGEAD_OK;
}

static void checkLifecycle(Creator* c) {
    for (int32_t dtype : {1, 10}) {
        Plugin* built = fromNode(c, exportedNode(24, 4, dtype));
        if (built == nullptr) {
            CHECK(built != nullptr);
            continue;
        }
        CHECK(configure(built, io(-1, 24, 4, typeOf(dtype))) == 0);
        checkEnqueue(built, dtype, "built plugin");
#if EDGEAD_TRT_V3
        IPluginV3* copy = built->clone();
        CHECK(copy != nullptr);
        if (copy != nullptr) {
            checkEnqueue(copy, dtype, "clone");
            destroy(copy);
        }
        PluginFieldCollection const* saved = runtime(built)->getFieldsToSerialize();
        CHECK(saved != nullptr && saved->nbFields == 3);
        // the engine stores these fields; deserialization passes them back to createPlugin(kRUNTIME)
        std::vector<std::vector<uint8_t>> bytes;
        std::vector<PluginField> fields;
        bytes.reserve(saved->nbFields);
        for (int32_t i = 0; i < saved->nbFields; ++i) {
            PluginField const& f = saved->fields[i];
            CHECK(f.type == PluginFieldType::kINT32 && f.length == 1);
            uint8_t const* data = static_cast<uint8_t const*>(f.data);
            bytes.emplace_back(data, data + sizeof(int32_t) * f.length);
            fields.emplace_back(f.name, bytes.back().data(), f.type, f.length);
        }
        destroy(built);  // the engine outlives the builder's plugin object
        PluginFieldCollection fc{};
        fc.nbFields = static_cast<int32_t>(fields.size());
        fc.fields = fields.data();
        Plugin* restored = create(c, &fc, TensorRTPhase::kRUNTIME);
        CHECK(restored != nullptr);
        if (restored == nullptr) continue;
        IPluginV3* attached = runtime(restored)->attachToContext(nullptr);
        CHECK(attached != nullptr);
        if (attached != nullptr) {
            Io run = io(3, 24, 4, typeOf(dtype));
            CHECK(runtime(attached)->onShapeChange(run.in, 3, run.out, 1) == 0);
            Io bad = io(3, 24, 4, typeOf(dtype));
            bad.in[1] = desc({4, 23}, DataType::kFLOAT);
            CHECK(runtime(attached)->onShapeChange(bad.in, 3, bad.out, 1) != 0);
            checkEnqueue(attached, dtype, "deserialized + attached");
            destroy(attached);
        }
        destroy(restored);
        // a damaged field set (e.g. whitening_dtype lost) does not come back as a plugin
        fields.pop_back();
        fc.nbFields = static_cast<int32_t>(fields.size());
        CHECK(create(c, &fc, TensorRTPhase::kRUNTIME) == nullptr);
#else
        CHECK(built->getSerializationSize() == 3 * sizeof(int32_t));
        std::vector<uint8_t> blob(built->getSerializationSize());
        built->serialize(blob.data());
        int32_t values[3];
        std::memcpy(values, blob.data(), sizeof(values));
        CHECK(values[0] == 24 && values[1] == 4 && values[2] == dtype);
        destroy(built);
        IPluginV2* restoredBase = c->deserializePlugin("node", blob.data(), blob.size());
        CHECK(restoredBase != nullptr);
        if (restoredBase == nullptr) continue;
        Plugin* restored = static_cast<Plugin*>(restoredBase);
        CHECK(restored->initialize() == 0);
        Plugin* copy = restored->clone();  // TensorRT clones the deserialized plugin per execution context
        CHECK(copy != nullptr);
        if (copy != nullptr) {
            checkEnqueue(copy, dtype, "deserialized + cloned");
            destroy(copy);
        }
        destroy(restored);
        CHECK(c->deserializePlugin("node", blob.data(), 2 * sizeof(int32_t)) == nullptr);  // old 8-byte form
        CHECK(c->deserializePlugin("node", nullptr, blob.size()) == nullptr);
        std::vector<uint8_t> corrupt = blob;
        int32_t const badDtype = 7;
        std::memcpy(corrupt.data() + 2 * sizeof(int32_t), &badDtype, sizeof(badDtype));
        CHECK(c->deserializePlugin("node", corrupt.data(), corrupt.size()) == nullptr);
        // a shape problem found by configurePlugin survives clone(): the clone refuses too
        Plugin* misconfigured = fromNode(c, exportedNode(24, 4, dtype));
        if (misconfigured != nullptr) {
            Io bad = io(2, 24, 4, typeOf(dtype));
            bad.in[2] = desc({4, 10}, typeOf(dtype));
            CHECK(configure(misconfigured, bad) != 0);
            Plugin* clone = misconfigured->clone();
            CHECK(clone != nullptr && clone->initialize() != 0);
            if (clone != nullptr) {
                int const before = g_call.calls;
                CHECK(enqueue(clone, io(2, 24, 4, typeOf(dtype))) != 0);
                CHECK(g_call.calls == before);
                destroy(clone);
            }
            destroy(misconfigured);
        }
#endif
    }
}

int main() {
    checkRegistration();
    Creator* c = theCreator();
    if (c != nullptr) {
        checkFieldParsing(c);
        checkFormats(c);
        checkOutputs(c);
        checkShapeRejection(c);
        checkLifecycle(c);
    }
    std::printf("plugin harness: TensorRT %d.%d.%d (%s): %d checks, %d failures\n", NV_TENSORRT_MAJOR,
                NV_TENSORRT_MINOR, NV_TENSORRT_PATCH, EDGEAD_TRT_V3 ? "IPluginV3" : "IPluginV2DynamicExt", g_checks,
                g_failures);
    return g_failures > 255 ? 255 : g_failures;
}
